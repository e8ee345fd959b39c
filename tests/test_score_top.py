"""Engine.score's per-position top-1 (``ScoreOutput.top_ids`` / ``top_logprobs``) against a plain
forward's log-softmax: the argmax token and its log-probability at every continuation position."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import SMOLLM2_135M
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.model.transformer import KVCache, Transformer
from jaxinfer.model.weights import nest, random_weights

TINY = dataclasses.replace(
    SMOLLM2_135M, name="llama-tiny", num_layers=2, hidden_size=72, intermediate_size=96,
    vocab_size=512, head_dim=8, max_position_embeddings=512,
)


def test_score_reports_argmax_and_its_logprob_per_position():
    w = random_weights(TINY, seed=0, scale=0.15)
    model = Transformer(TINY, params=nest({k: jnp.asarray(v) for k, v in w.items()}))
    rng = np.random.default_rng(0)
    seq = [int(t) for t in rng.integers(3, 512, 20)]
    ctx, T = 5, len(seq)

    def logprobs(ids):  # one plain forward, no engine
        h, _ = model(jnp.asarray([ids], jnp.int32), jnp.arange(T, dtype=jnp.int32)[None],
                     KVCache.zeros(TINY, 1, T, jnp.float32), None, T)
        return np.asarray(jax.nn.log_softmax(model.logits(h[0]), axis=-1))  # [T, V]

    # one continuation token made the argmax on purpose, so both outcomes of the greedy check occur
    cont = seq[ctx:]
    cont[0] = int(logprobs(seq)[ctx - 1].argmax())
    rows = logprobs(seq[:ctx] + cont)[ctx - 1 : T - 1]
    eng = Engine(model, EngineConfig(slots=2, max_len=64, prefill_buckets=(16,), min_span=32, lazy_compile=True))
    out = eng.score(seq[:ctx], cont)
    assert len(out.top_ids) == len(out.top_logprobs) == len(cont)
    assert list(out.top_ids) == [int(r.argmax()) for r in rows]
    np.testing.assert_allclose(out.top_logprobs, rows.max(axis=-1), atol=1e-4)
    np.testing.assert_allclose(out.token_logprobs, [r[t] for r, t in zip(rows, cont)], atol=1e-4)
    assert out.top_ids[0] == cont[0]
    assert out.is_greedy == all(a == b for a, b in zip(out.top_ids, cont))
    assert not out.is_greedy  # random tokens after the first are not all argmax
