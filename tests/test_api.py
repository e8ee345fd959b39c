"""The Python API (jaxinfer.load / LLM / Completion) on the tiny BPE checkpoint, ``jaxinfer generate``
stopping exactly as the gRPC server does, and one SmolLM2 check (real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jaxinfer
from jaxinfer.cli import main
from jaxinfer.client import InferenceClient, generate_request
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.types import SamplingParams
from jaxinfer.loading import build_engine
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import NotAcceptingError
from jaxinfer.tokenizer import tokenize_pair
from server.app import ModelDescription, ServerOptions, build_server
from tests.helpers.drive import drive, score_direct
from tests.helpers.tiny import BPE_ENGINE

PROMPT = "The lighthouse keeper"
# the engine `jaxinfer generate --max-seqs 4 --max-len 128 --prefill-buckets 16,64 --kv-cache-memory 1MiB` builds
CLI_ENGINE = EngineConfig(max_seqs=4, max_len=128, prefill_buckets=(16, 64), kv_cache_bytes=1 << 20, lazy_compile=True)
CLI_FLAGS = ["--max-seqs", "4", "--max-len", "128", "--prefill-buckets", "16,64", "--kv-cache-memory", "1MiB"]


def hand_greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from direct engine.prefill + engine.decode calls (no scheduler)."""
    return drive(engine, [ids], max_tokens=n)[0]["token_ids"]


def test_exports():
    assert set(jaxinfer.__all__) == {"load", "LLM", "Completion", "Engine", "EngineConfig", "SamplingParams",
                                     "__version__"}
    assert jaxinfer.SamplingParams is SamplingParams and jaxinfer.Engine is Engine


def test_load_generate_score_tokenizer(tiny_ckpt: Path):
    llm = jaxinfer.load(tiny_ckpt, engine=BPE_ENGINE)
    tok = llm.tokenizer
    ids = tok.encode(PROMPT)
    llm.close()  # the reference drives the engine directly, with no scheduler holding its pool
    want = hand_greedy(llm.engine, ids, 8)
    ctx, cont = tokenize_pair(tok, PROMPT, " was", llm.engine.cfg.bos_token_id)
    direct = score_direct(llm.engine, ctx, cont)
    with jaxinfer.LLM(llm.engine) as llm:
        outs = llm.generate([PROMPT, ids], jaxinfer.SamplingParams(temperature=0.0), max_tokens=8, ignore_eos=True,
                            logprobs=True)
        for out in outs:
            assert isinstance(out, jaxinfer.Completion)
            assert list(out.token_ids) == want and out.finish_reason == "length"
            assert out.text == tok.decode(want) and out.prompt_token_ids == tuple(ids)
            assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 8)
            assert [t.token for t in out.logprobs] == want and all(t.logprob <= 0 for t in out.logprobs)
        # one SamplingParams each; a seeded sample repeats
        a, b = llm.generate([PROMPT, PROMPT], [SamplingParams(temperature=1.0, seed=5)] * 2, max_tokens=6,
                            ignore_eos=True)
        assert a.token_ids == b.token_ids
        # stop ids end the generation on that token; min_tokens holds stop conditions off
        stop_id = want[2]
        (s,) = llm.generate(ids, max_tokens=8, stop_token_ids=[stop_id], ignore_eos=True)
        assert s.finish_reason == "stop" and list(s.token_ids) == want[: want.index(stop_id) + 1]
        (m,) = llm.generate(ids, max_tokens=8, stop_token_ids=[stop_id], min_tokens=4, ignore_eos=True)
        later = [i for i, t in enumerate(want) if t == stop_id and i + 1 >= 4]  # counted from the 4th token on
        assert list(m.token_ids) == (want[: later[0] + 1] if later else want)
        assert m.finish_reason == ("stop" if later else "length")

        (score,) = llm.score([(PROMPT, " was")])
        assert score.context_ids == tuple(ctx) and score.continuation_ids == tuple(cont)
        assert score.logprob == pytest.approx(direct.logprob, abs=1e-5)
        assert llm.score([(ctx, cont)])[0].logprob == pytest.approx(score.logprob, abs=1e-6)


def test_bad_input_names_the_field(tiny_engine: Engine):
    with jaxinfer.LLM(tiny_engine) as llm:
        with pytest.raises(ValueError, match="sampling: 1 SamplingParams for 2 prompts"):
            llm.generate(["a", "b"], [SamplingParams()])
        with pytest.raises(ValueError, match=r"prompts\[0\] has 128 tokens: the engine's max_len=128"):
            llm.generate([[5] * 128])
        with pytest.raises(ValueError, match="chat=True takes text prompts"):
            llm.generate([[5, 6]], chat=True)
        with pytest.raises(ValueError, match="temperature"):
            llm.generate(["a"], SamplingParams(temperature=-1.0))
        with pytest.raises(ValueError, match="tokenizes to nothing"):
            llm.score([("a", "")])
    with pytest.raises(NotAcceptingError):
        llm.generate(["a"])  # closed


def test_cli_generate_stops_as_the_server_does(tiny_ckpt: Path, capsys):
    """`jaxinfer generate --stop S --min-tokens 1 --logprobs 2` gives the text, ids, finish reason and
    logprobs the Generate RPC gives for the same request on the same engine configuration."""
    engine = build_engine(tiny_ckpt, CLI_ENGINE)
    srv = build_server(engine, engine.tokenizer, ModelDescription("tiny-bpe"), ServerOptions(),
                       metrics=Metrics()).start()
    try:
        with InferenceClient(f"127.0.0.1:{srv.port}", timeout=120) as client:
            free = "".join(r.text for r in client.generate(generate_request(PROMPT, max_tokens=24, ignore_eos=True)))
            stop = free[len(free) // 2 : len(free) // 2 + 2]
            assert len(stop) == 2 and stop.strip(), free
            req = generate_request(PROMPT, max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=1, logprobs=2)
            resps = list(client.generate(req))
    finally:
        srv.stop()
    rpc_text = "".join(r.text for r in resps)
    assert rpc_text == free[: free.index(stop)] and resps[-1].finish_reason == "stop"

    argv = ["generate", PROMPT, "--model", str(tiny_ckpt), *CLI_FLAGS, "--max-tokens", "24", "--ignore-eos",
            "--stop", stop, "--min-tokens", "1", "--logprobs", "2", "--json"]
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    got = json.loads(line)
    assert got["text"] == rpc_text and got["finish_reason"] == "stop"
    assert got["token_ids"] == [t for r in resps for t in r.token_ids]
    rpc_lps = [lp for r in resps for lp in r.logprobs]
    assert [x["token_id"] for x in got["logprobs"]] == [lp.token_id for lp in rpc_lps]
    for x, lp in zip(got["logprobs"], rpc_lps):
        assert x["logprob"] == pytest.approx(lp.logprob, abs=1e-5)
        assert x["top_token_ids"] == list(lp.top_token_ids)


@pytest.mark.real
def test_smollm2_through_the_api(smollm2_dir: Path):
    with jaxinfer.load(smollm2_dir, engine=EngineConfig(max_seqs=2, max_len=256, kv_cache_bytes=1 << 24, lazy_compile=True)) as llm:
        (out,) = llm.generate(["The capital of France is"], jaxinfer.SamplingParams(), max_tokens=16, stop=["."])
        assert "Paris" in out.text and out.finish_reason == "stop" and "." not in out.text
        paris, london = llm.score([("The capital of France is", " Paris"), ("The capital of France is", " London")])
        assert paris.logprob > london.logprob
        assert llm.tokenizer.decode(llm.tokenizer.encode("Hello", add_bos=False)) == "Hello"
