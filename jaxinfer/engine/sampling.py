"""Batched on-device sampling with per-slot parameters.

One compiled function serves a batch whose slots have different temperatures,
top-k, top-p, min-p, penalties and seeds. Each slot's randomness depends only on
its own seed and the position of the token being sampled, so a seeded request
yields the same tokens alone or beside 31 others.

Reported log-probabilities are those of the model's own distribution (before
penalties, temperature and filters), as other servers report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.engine.types import MAX_TOP_LOGPROBS, SamplingParams

F32 = jnp.float32
NEG = -1e30


@jax.tree_util.register_dataclass
@dataclass
class SlotSampling:
    """Sampling parameters of every slot, stacked. Shapes: [slots] unless noted."""

    temperature: jax.Array  # f32
    top_k: jax.Array  # i32, 0 = off
    top_p: jax.Array  # f32, 1 = off
    min_p: jax.Array  # f32, 0 = off
    repetition_penalty: jax.Array  # f32, 1 = off
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    seed: jax.Array  # u32 [slots, 2]: (high, low) words of the 64-bit seed

    @staticmethod
    def host_row(p: SamplingParams, default_seed: int) -> dict[str, np.ndarray]:
        seed = default_seed if p.seed is None else p.seed
        return {
            "temperature": np.float32(p.temperature),
            "top_k": np.int32(p.top_k),
            "top_p": np.float32(p.top_p),
            "min_p": np.float32(p.min_p),
            "repetition_penalty": np.float32(p.repetition_penalty),
            "presence_penalty": np.float32(p.presence_penalty),
            "frequency_penalty": np.float32(p.frequency_penalty),
            "seed": np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32),
        }

    @classmethod
    def zeros(cls, slots: int) -> "SlotSampling":
        return cls(
            temperature=jnp.zeros((slots,), F32),
            top_k=jnp.zeros((slots,), jnp.int32),
            top_p=jnp.ones((slots,), F32),
            min_p=jnp.zeros((slots,), F32),
            repetition_penalty=jnp.ones((slots,), F32),
            presence_penalty=jnp.zeros((slots,), F32),
            frequency_penalty=jnp.zeros((slots,), F32),
            seed=jnp.zeros((slots, 2), jnp.uint32),
        )


@jax.tree_util.register_dataclass
@dataclass
class Sampled:
    token: jax.Array  # i32 [B]
    logprob: jax.Array  # f32 [B]
    top_ids: jax.Array  # i32 [B, MAX_TOP_LOGPROBS]
    top_logprobs: jax.Array  # f32 [B, MAX_TOP_LOGPROBS]


def apply_penalties(logits, s: SlotSampling, counts, seen):
    """logits [B, V] f32; counts [B, V] i32 generated-token counts; seen [B, V] bool
    (prompt or generated). Repetition penalty on everything seen, presence and
    frequency penalties on generated tokens only."""
    rp = s.repetition_penalty[:, None]
    penalised = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(seen, penalised, logits)
    c = counts.astype(F32)
    return logits - s.presence_penalty[:, None] * (c > 0) - s.frequency_penalty[:, None] * c


def _filter_sorted(logits, s: SlotSampling):
    """Top-k and top-p by a descending sort (only run when some slot asks)."""
    V = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    rank = jnp.arange(V)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, V)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (rank < k) & ((mass_before < s.top_p[:, None]) | (rank == 0))
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG)


def sample(logits, s: SlotSampling, counts, seen, positions) -> Sampled:
    """Sample one token per row. logits [B, V] f32 (raw model output); s, counts,
    seen: rows for these B sequences; positions [B]: position the sampled token
    will occupy (mixed into the slot's random key)."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    x = apply_penalties(logits, s, counts, seen)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    x = x / temp
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= s.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), x, NEG)
    need_sort = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0)))
    x = jax.lax.cond(need_sort, lambda z: _filter_sorted(z, s), lambda z: z, x)

    def one_key(seed, pos):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed[0]), seed[1])
        return jax.random.fold_in(key, pos)

    keys = jax.vmap(one_key)(s.seed, positions)
    sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
    token = jnp.where(s.temperature > 0, sampled, greedy_tok)
    lp = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Sampled(token, lp, top_ids.astype(jnp.int32), top_lp)
