"""Evaluation: the window definition, perplexity / choice / generation on a tiny random model with
a real byte-level BPE tokenizer (in process, through the CLI, against an in-process server, from a
training run's Orbax checkpoints), packed scoring, and SmolLM2 against transformers (float32):
perplexity within 0.1% and multiple-choice log-likelihoods."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer.api import LLM
from jaxinfer.cli import main
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.evaluation.backend import EngineBackend, GenerationOptions, Prompt, ServerBackend
from jaxinfer.evaluation.choice import evaluate_choice, read_items, summarize
from jaxinfer.evaluation.perplexity import aggregate, evaluate_perplexity, rolling_windows
from jaxinfer.loading import build_engine
from jaxinfer.model.transformer import Transformer
from jaxinfer.model.weights import nest
from jaxinfer.tokenizer import tokenize_pair
from tests.helpers.drive import score_direct
from tests.helpers.scheduled import generate
from tests.helpers.tiny import BPE_ENGINE, BPE_TINY, DATA, bpe_tokenizer, bpe_weights

TEXT = (DATA / "ppl.txt").read_text()


@nnx.jit
def _log_softmax_forward(m, x):
    h, _ = m(x, jnp.arange(x.shape[1], dtype=jnp.int32)[None])
    return jax.nn.log_softmax(m.logits(h[0]).astype(jnp.float32), axis=-1)


def forward_logprobs(model: Transformer, ids: list[int], pad_to: int = 128) -> np.ndarray:
    """log-softmax of one plain forward over ``ids`` (no cache, no engine); padded at the end to one
    compiled length, which causal attention makes harmless to the positions before it."""
    x = np.zeros((1, pad_to), np.int32)
    x[0, : len(ids)] = ids
    return np.asarray(_log_softmax_forward(model, jnp.asarray(x)), np.float64)[: len(ids)]


# --- the definition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,window,stride", [(1, 4, 2), (2, 4, 2), (4, 4, 3), (10, 4, 1), (10, 4, 3), (37, 8, 3),
                                             (100, 16, 8), (100, 200, 100), (33, 32, 31)])
def test_windows_score_every_target_once_with_enough_context(n, window, stride):
    wins = rolling_windows(n, window, stride)
    scored = [t for w in wins for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))  # every token after the first, once, in order
    for w in wins:
        assert w.end - w.begin <= window and w.begin < w.score_from < w.end
        for t in range(w.score_from, w.end):  # context of target t: ids[w.begin:t]
            assert t - w.begin >= min(window - stride, t) and t - w.begin <= window - 1
    if n <= window:
        assert len(wins) == (1 if n > 1 else 0) and (not wins or (wins[0].begin, wins[0].score_from) == (0, 1))
    for bad in ((n, window, window), (n, window, 0), (n, 1, 1)):
        with pytest.raises(ValueError):
            rolling_windows(*bad)


# --- tiny model, in process -------------------------------------------------------------------------


@pytest.mark.parametrize("window,stride", [(128, 64), (32, 8), (24, 23)])
def test_perplexity_equals_a_plain_forward_per_window(tiny_engine, tiny_ckpt, window, stride):
    from jaxinfer.checkpoint import load_checkpoint

    backend = EngineBackend(tiny_engine)
    (doc,) = evaluate_perplexity(backend, [("ppl", TEXT[:400])], window=window, stride=stride)
    ids = backend.tokenize(TEXT[:400])
    assert ids[0] == 0 and len(ids) > 100  # BOS, then the text
    model = Transformer(BPE_TINY, params=load_checkpoint(tiny_ckpt).params)
    nll, prev, k = 0.0, 1, 0
    while prev < len(ids):  # the reference, written out: window k ends at window + k * stride
        end = min(window + k * stride, len(ids))
        begin = max(end - window, 0)
        lp = forward_logprobs(model, ids[begin:end])
        nll -= sum(lp[t - begin - 1, ids[t]] for t in range(prev, end))
        prev, k = end, k + 1
    assert doc.tokens == len(ids) - 1 and doc.bytes == len(TEXT[:400].encode())  # BOS: the whole text is scored
    assert doc.nll == pytest.approx(nll, rel=1e-5)
    assert doc.perplexity == pytest.approx(math.exp(nll / doc.tokens), rel=1e-5)
    assert doc.bits_per_byte == pytest.approx(nll / math.log(2) / doc.bytes, rel=1e-5)


def test_scheduler_scoring_equals_direct_engine_scoring(tiny_engine):
    """Pairs scored through the scheduler (pages, prefix cache, pieces of prefill_chunk) equal each
    pair scored alone by direct engine calls; a pair longer than max_len is refused naming it."""
    rng = np.random.default_rng(0)
    pairs = [([int(t) for t in rng.integers(2, 300, c)], [int(t) for t in rng.integers(2, 300, x)])
             for c, x in [(1, 1), (5, 3), (20, 9), (3, 40), (60, 60), (7, 1), (2, 2), (15, 15), (30, 2), (90, 30)]]
    pairs.append((pairs[4][0], pairs[3][1]))  # a context scored before: its cached pages are reused
    want = [score_direct(tiny_engine, c, x) for c, x in pairs]
    with LLM(tiny_engine) as llm:
        got = llm.score(pairs)
        with pytest.raises(ValueError, match="max_len"):
            llm.score([([1] * 100, [2] * 29)])
    for pair, g, w in zip(pairs, got, want):
        assert g.continuation_ids == tuple(pair[1]) and g.context_ids == tuple(pair[0])
        np.testing.assert_allclose(g.token_logprobs, w.token_logprobs, atol=1e-5)
        assert g.is_greedy == w.is_greedy and g.top_ids == w.top_ids


def test_choice_is_argmax_of_jaxinfer_scores(tiny_engine):
    backend = EngineBackend(tiny_engine)
    items = read_items(DATA / "choice.jsonl")
    outcomes = evaluate_choice(backend, items)
    tok = tiny_engine.tokenizer
    hits = hits_norm = 0
    for it, o in zip(items, outcomes):
        ref = [score_direct(tiny_engine, *tokenize_pair(tok, it.context, c)).logprob for c in it.choices]
        np.testing.assert_allclose(o.logprobs, ref, atol=1e-4)
        hits += int(np.argmax(ref)) == it.label
        hits_norm += int(np.argmax([r / len(c) for r, c in zip(ref, it.choices)])) == it.label
    s = summarize(outcomes)
    assert s["items"] == len(items) and s["acc"] == hits / len(items) and s["acc_norm"] == hits_norm / len(items)


def test_cli_perplexity_choice_generate(tiny_ckpt, tiny_engine, tmp_path, capsys):
    base = ["--model", str(tiny_ckpt), "--max-seqs", "4", "--max-len", "128", "--kv-cache-memory", "1MiB", "--no-progress"]
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(DATA / "ppl.txt"), str(DATA / "rolling.jsonl"), "--window", "64",
                 "--stride", "32", "-o", str(out), *base]) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "perplexity" and doc["checkpoint"] == str(tiny_ckpt) and doc["step"] is None
    assert doc["config"]["name"] == "tiny-bpe" and doc["dtype"] == "float32" and "data" in doc["mesh"]
    assert doc["engine"] == {"slots": 4, "max_len": 128} and doc["settings"]["window"] == 64
    assert doc["elapsed_s"] > 0 and doc["throughput"]["scored_tokens_per_s"] > 0
    docs = doc["results"]["documents"]
    assert [d["name"] for d in docs][:2] == [str(DATA / "ppl.txt"), f"{DATA / 'rolling.jsonl'}:1"] and len(docs) == 4
    total = doc["results"]["total"]
    assert total["tokens"] == sum(d["tokens"] for d in docs)
    assert total["perplexity"] == pytest.approx(math.exp(sum(d["nll"] for d in docs) / total["tokens"]))
    table = capsys.readouterr().out
    assert "| document" in table and "tokens/s" in table

    assert main(["eval", "choice", str(DATA / "choice.jsonl"), "-o", str(out), "--samples",
                 str(tmp_path / "s.jsonl"), *base]) == 0
    doc = json.loads(out.read_text())
    ref = summarize(evaluate_choice(EngineBackend(tiny_engine), read_items(DATA / "choice.jsonl")))
    assert doc["results"]["acc"] == ref["acc"] and doc["results"]["acc_norm"] == ref["acc_norm"]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 10

    gens = tmp_path / "gens.jsonl"
    assert main(["eval", "generate", str(DATA / "prompts.jsonl"), "-g", str(gens), "--max-tokens", "16", "-o",
                 str(out), *base]) == 0
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["completion_tokens"] <= 12 and all(r["completion_tokens"] <= 16 for r in rows)
    assert "." not in rows[2]["generation"]
    tok = tiny_engine.tokenizer
    direct = generate(tiny_engine, [tok.encode("The capital of France is")], max_tokens=16)[0]
    assert rows[0]["generation"] == tok.decode(direct["token_ids"]) and rows[0]["finish_reason"] == direct["finish_reason"]
    assert json.loads(out.read_text())["results"]["prompts"] == 4


# --- against a server -------------------------------------------------------------------------------


def test_server_backend_equals_in_process(tiny_engine):
    from jaxinfer.metrics import Metrics
    from server.app import ModelDescription, ServerOptions, build_server

    local = EngineBackend(tiny_engine)
    docs = [("a", TEXT[:200]), ("b", TEXT[500:650])]
    items = read_items(DATA / "choice.jsonl")[:4]
    prompts = [Prompt(text="The lighthouse"), Prompt(messages=(("user", "Hello"),))]
    opts = [GenerationOptions(max_tokens=10, stop=("e",)), GenerationOptions(max_tokens=6)]
    want_ppl = evaluate_perplexity(local, docs, window=128)
    want_choice = evaluate_choice(local, items)
    want_gen = local.generate(prompts, opts)
    srv = build_server(tiny_engine, tiny_engine.tokenizer, ModelDescription("tiny-bpe"), ServerOptions(),
                       metrics=Metrics()).start()
    try:
        with ServerBackend(f"127.0.0.1:{srv.port}", concurrency=4) as remote:
            assert remote.info.add_bos and remote.info.bos_id == 0 and remote.info.max_len == 128
            got_ppl = evaluate_perplexity(remote, docs, window=128)  # one window each: exact over the wire
            for g, w in zip(got_ppl, want_ppl):
                assert (g.tokens, g.bytes, g.inexact_windows) == (w.tokens, w.bytes, 0)
                assert g.nll == pytest.approx(w.nll, rel=1e-5)
            # windows after the first: the Score RPC puts BOS before every context, which is flagged
            (many,) = evaluate_perplexity(remote, docs[:1], window=32, stride=16)
            assert many.inexact_windows == many.windows - 1 > 0
            for g, w in zip(evaluate_choice(remote, items), want_choice):
                np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
            assert remote.generate(prompts, opts) == want_gen
    finally:
        srv.stop()


# --- a training run's Orbax checkpoints ---------------------------------------------------------------


def test_training_run_checkpoint_by_step(tmp_path, tiny_ckpt, capsys):
    import orbax.checkpoint as ocp

    run = tmp_path / "run"
    steps = {10: bpe_weights(seed=1), 20: bpe_weights(seed=2)}
    with ocp.CheckpointManager(run, item_names=("state",)) as mngr:
        for step, w in steps.items():
            params = jax.tree.map(lambda a: {"value": a}, nest(w))  # Flax NNX variable-state leaves
            state = {"model": params, "opt_state": {"mu": nest({k: np.zeros_like(v) for k, v in w.items()})},
                     "step": np.int32(step)}
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mngr.wait_until_finished()
    (tmp_path / "config.json").write_text(BPE_TINY.to_json())

    def expected(w):
        eng = Engine(Transformer(BPE_TINY, params=nest({k: jnp.asarray(v) for k, v in w.items()})), BPE_ENGINE,
                     tokenizer=bpe_tokenizer(True))
        return aggregate(evaluate_perplexity(EngineBackend(eng), [("t", TEXT[:300])], window=128)).nll

    doc_file = tmp_path / "t.txt"
    doc_file.write_text(TEXT[:300])
    base = ["eval", "perplexity", str(doc_file), "--model", str(run), "--model-config", str(tmp_path / "config.json"),
            "--tokenizer", str(tiny_ckpt / "tokenizer"), "--max-len", "128", "--max-seqs", "2", "--kv-cache-memory", "1MiB", "--no-progress"]
    for step_args, step in (([], 20), (["--step", "10"], 10)):
        out = tmp_path / f"r{step}.json"
        assert main([*base, *step_args, "-o", str(out)]) == 0
        doc = json.loads(out.read_text())
        assert doc["step"] == step and doc["checkpoint"].endswith(f"{step}/state")
        assert doc["results"]["total"]["nll"] == pytest.approx(expected(steps[step]), rel=1e-5)
    assert main([*base, "--step", "30"]) == 2 and "no step 30" in capsys.readouterr().err
    assert main([*base[:5], *base[7:]]) == 2  # no --model-config for a training run
    assert "--model-config" in capsys.readouterr().err


# --- SmolLM2 against transformers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    eng = build_engine(smollm2_dir, EngineConfig(max_seqs=4, max_len=512, kv_cache_bytes=1 << 25, lazy_compile=True))
    return EngineBackend(eng, checkpoint=smollm2_dir)


def hf_window_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """NLL (nats) and scored tokens under the same definition, from transformers in float64 log-softmax."""
    import torch

    nll, n, prev, k = 0.0, 0, 1, 0
    while prev < len(ids):
        end = min(window + k * stride, len(ids))
        begin = max(end - window, 0)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for t in range(prev, end):
            nll -= float(lp[t - begin - 1, ids[t]])
            n += 1
        prev, k = end, k + 1
    return nll, n


@pytest.mark.real
def test_smollm2_perplexity_equals_transformers(smollm2, smollm2_dir, hf_from_gguf):
    hf = hf_from_gguf(smollm2_dir)
    ids = smollm2.tokenize(TEXT)
    assert ids[0] != smollm2.info.bos_id and 300 < len(ids) < 512  # no BOS: the first token is context only
    for window, stride in ((512, 256), (128, 64)):  # one window (the textbook definition); sliding windows
        (doc,) = evaluate_perplexity(smollm2, [("ppl", TEXT)], window=window, stride=stride)
        ref_nll, ref_n = hf_window_nll(hf, ids, window, stride)
        assert doc.tokens == ref_n == len(ids) - 1
        assert doc.perplexity == pytest.approx(math.exp(ref_nll / ref_n), rel=1e-3)
        first = smollm2.tokenizer.decode(ids[:1])
        assert doc.bytes == len(TEXT.encode()) - len(first.encode())
        assert doc.bits_per_byte == pytest.approx(ref_nll / math.log(2) / doc.bytes, rel=1e-3)


@pytest.mark.real
def test_smollm2_choice_loglikelihoods_equal_transformers(smollm2, smollm2_dir, hf_from_gguf):
    import torch  # heavy: only the real-model tests load it

    hf = hf_from_gguf(smollm2_dir)
    items = read_items(DATA / "choice.jsonl")[:5]
    outcomes = evaluate_choice(smollm2, items)
    for it, o in zip(items, outcomes):
        ref = []
        for c in it.choices:
            ctx, cont = tokenize_pair(smollm2.tokenizer, it.context, c)
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)
            ref.append(sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        for got, want, n in zip(o.logprobs, ref, o.token_counts):
            assert abs(got - want) < 2e-3 * n, (it.id, got, want)
        assert o.pred == int(np.argmax(ref))
