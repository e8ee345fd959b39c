"""The real models (SmolLM2-135M-Instruct, Gemma 3 270M, from their registry
packages) through the compiled engine against transformers on the same GGUF:
greedy generations and scores. CLI generate/score round trips on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxinfer.engine.engine import EngineConfig
from jaxinfer.loading import build_engine
from jaxinfer.tokenizer import tokenize_pair
from tests.helpers.drive import score_direct
from tests.helpers.reference import hf_greedy
from tests.helpers.scheduled import generate

pytestmark = pytest.mark.real

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
PAIRS = [
    ("The capital of France is", " Paris."),
    ("2 + 2 =", " 4"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Question: What color is the sky?\nAnswer:", " Blue, mostly."),
    ("日本の首都は", "東京です。"),
]
N_NEW = 32


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, hf_from_gguf):
    d = request.getfixturevalue(f"{request.param}_dir")
    eng = build_engine(d, EngineConfig(max_seqs=3, max_len=256, prefill_buckets=(32,), kv_cache_bytes=1 << 25, lazy_compile=True))
    return request.param, eng, hf_from_gguf(d)


def test_greedy_generation_equals_transformers(real):
    name, eng, hf = real
    tok = eng.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    res = generate(eng, ids, max_tokens=N_NEW, ignore_eos=True)
    for p, r in zip(ids, res):
        assert r["token_ids"] == hf_greedy(hf, p, N_NEW), (name, tok.decode(p))


def test_score_equals_transformers(real):
    name, eng, hf = real
    for context, continuation in PAIRS:
        ctx, cont = tokenize_pair(eng.tokenizer, context, continuation)
        got = score_direct(eng, ctx, cont)
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(hf(seq).logits[0].double(), -1)
        ref = [float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)]
        np.testing.assert_allclose(got.token_logprobs, ref, atol=2e-3)
        assert abs(got.logprob - sum(ref)) < 2e-3 * len(cont)
        greedy = all(int(lp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
        assert got.is_greedy == greedy


def _cli(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "jaxinfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_generate_and_score(smollm2_dir):
    out = _cli("generate", "--model", str(smollm2_dir), "--max-len", "128", "--max-tokens", "8", "--json",
               PROMPTS[0], PROMPTS[2])
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert set(r) >= {"text", "token_ids", "prompt_token_ids", "finish_reason"}
        assert len(r["token_ids"]) <= 8 and r["finish_reason"] in ("stop", "length")
    assert rows[0]["text"].strip().startswith("Paris")
    lines = "\n".join(json.dumps({"context": c, "continuation": x}) for c, x in PAIRS[:2])
    out = _cli("score", "--model", str(smollm2_dir), "--max-len", "128", stdin=lines)
    scored = [json.loads(line) for line in out.splitlines()]
    assert len(scored) == 2
    for s in scored:
        assert s["logprob"] == pytest.approx(sum(s["token_logprobs"]), abs=1e-4)
        assert len(s["token_logprobs"]) == len(s["continuation_ids"])
    assert scored[0]["logprob"] > -5.0  # " Paris." after "The capital of France is" is likely
