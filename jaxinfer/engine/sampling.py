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


def _bisect(lo, hi, keep_enough, iters: int = 32):
    """Largest t in [lo, hi] (per row) with keep_enough(t) true, by bisection;
    keep_enough must be true at lo and monotone (true, then false)."""

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = keep_enough(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, body, (lo, hi))
    return lo


def filter_top_k_top_p(x, s: SlotSampling):
    """Top-k, then top-p on what top-k kept, without sorting the vocabulary
    (a sort of [slots, vocab] costs ~100x more on CPU): each threshold is found
    by bisection. Ties at a threshold are kept, as transformers does."""
    V = x.shape[-1]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)[:, None]
    finite = jnp.where(x > NEG / 2, x, jnp.inf)
    lo, hi = jnp.min(finite, -1, keepdims=True), jnp.max(x, -1, keepdims=True)
    t_k = _bisect(lo, hi, lambda t: jnp.sum(x >= t, -1, keepdims=True) >= k)
    x = jnp.where(x >= t_k, x, NEG)
    p = jax.nn.softmax(x, axis=-1)
    top_p = s.top_p[:, None]
    t_p = _bisect(jnp.zeros_like(top_p), jnp.max(p, -1, keepdims=True),
                  lambda t: jnp.sum(jnp.where(p >= t, p, 0.0), -1, keepdims=True) >= top_p * (1 - 1e-6))
    return jnp.where(p >= t_p, x, NEG)


def argmax_first(x: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties), as a max and a min
    reduction: several times faster than XLA CPU's variadic argmax reduce."""
    return max_argmax(x)[1]


def _chunk(n: int) -> int:
    """The largest chunk length from 512 down to 64 that divides n; 0 if none does."""
    return next((c for c in (512, 256, 128, 64) if n % c == 0 and n > c), 0)


def max_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max, first index of the max) over the last axis, reading x once.

    x is cut into chunks (no copy: a reshape); a pass takes each chunk's max,
    the first chunk whose max is the row's max is picked from those few values,
    and the first index of the max is found in that chunk alone. The plain
    form (max, then the minimum index where x equals it) reads x twice and, on
    XLA CPU, writes two more [..., V] arrays, which dominates with a large
    vocabulary. Rows too short to chunk use the plain form."""
    V = x.shape[-1]
    c = _chunk(V)
    if not c:
        m = jnp.max(x, axis=-1)
        iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
        return m, jnp.min(jnp.where(x == m[..., None], iota, V), axis=-1)
    xc = x.reshape(*x.shape[:-1], V // c, c)
    cmax = jnp.max(xc, axis=-1)  # [..., V // c]
    m = jnp.max(cmax, axis=-1)
    n = V // c
    iota = jax.lax.broadcasted_iota(jnp.int32, cmax.shape, cmax.ndim - 1)
    blk = jnp.minimum(jnp.min(jnp.where(cmax == m[..., None], iota, n), axis=-1), n - 1)
    inner = jnp.take_along_axis(xc, blk[..., None, None], axis=-2)[..., 0, :]  # [..., c]
    iota = jax.lax.broadcasted_iota(jnp.int32, inner.shape, inner.ndim - 1)
    idx = jnp.minimum(jnp.min(jnp.where(inner == m[..., None], iota, c), axis=-1), c - 1)
    return m, (blk * c + idx).astype(jnp.int32)


def logsumexp_from_max(x: jax.Array, m: jax.Array) -> jax.Array:
    """logsumexp over the last axis given its max ``m`` (as jax.nn.logsumexp
    computes it, without a second pass for the max)."""
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    return safe + jnp.log(jnp.sum(jnp.exp(x - safe[..., None]), axis=-1))


# Rows sample among this many top candidates when their filters keep no more.
N_CANDIDATES = 64
_CAND_CHUNK = 64


def top_candidates(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of x [B, V], descending, and their
    indices, reading x once: the k chunks (of 64) with the largest maxima hold
    every entry above the k-th largest value, so one top-k runs over those k
    chunks alone. XLA CPU's top-k over a whole row is several times slower (and
    a sort of it ~100x). Small vocabularies take one top-k."""
    B, V = x.shape
    c = _CAND_CHUNK
    if V % c or V // c < 2 * k:
        v, i = jax.lax.top_k(x, k)
        return v, i.astype(jnp.int32)
    xc = x.reshape(B, V // c, c)
    _, chunks = jax.lax.top_k(jnp.max(xc, axis=-1), k)  # [B, k]
    sub = jnp.take_along_axis(xc, chunks[:, :, None], axis=1).reshape(B, k * c)
    v, pos = jax.lax.top_k(sub, k)
    ids = jnp.take_along_axis(chunks, pos // c, axis=1) * c + pos % c
    return v, ids.astype(jnp.int32)


def _kept_weights(z, temp, t, m):
    """exp(z / temp - m) where z / temp >= t, else 0 (z: raw logits, any rank;
    temp, t, m: [B], broadcast over z's trailing axes)."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    zt = z / temp.reshape(shape)
    return jnp.where(zt >= t.reshape(shape), jnp.exp(zt - m.reshape(shape)), 0.0)


def kept_mass(x, temp, t, m):
    """[B] sum of exp(x / temp - m) over the entries with x / temp >= t, in one
    pass that writes no [B, V] array."""
    return jnp.sum(_kept_weights(x, temp, t, m), axis=-1)


def draw_above(x, temp, t, m, u):
    """One index per row from softmax(x / temp) restricted to x / temp >= t
    (x: raw logits [B, V]; temp, t, m (the row max of x / temp), u: [B]):
    inverse-CDF sampling in two levels, block sums in one fused pass, then the
    chosen block alone, so no [B, V] array of probabilities is written."""
    B, V = x.shape
    c = _chunk(V)
    if not c:
        return inverse_cdf(_kept_weights(x, temp, t, m), u)
    xb = x.reshape(B, V // c, c)
    cdf = jnp.cumsum(jnp.sum(_kept_weights(xb, temp, t, m), axis=-1), axis=-1)  # [B, nb]
    nb = V // c
    target = u * cdf[:, -1]
    blk = jnp.minimum(jnp.sum(cdf < target[:, None], axis=-1), nb - 1)
    before = jnp.where(blk > 0, jnp.take_along_axis(cdf, jnp.maximum(blk - 1, 0)[:, None], 1)[:, 0], 0.0)
    inner = _kept_weights(jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0], temp, t, m)  # [B, c]
    idx = jnp.sum(before[:, None] + jnp.cumsum(inner, axis=-1) < target[:, None], axis=-1)
    last = c - 1 - argmax_first((inner[:, ::-1] > 0).astype(jnp.int32))
    return (blk * c + jnp.minimum(idx, last)).astype(jnp.int32)


def inverse_cdf(probs: jax.Array, u: jax.Array, block: int = 256) -> jax.Array:
    """Draw one index per row of ``probs`` [B, V] with one uniform ``u`` [B] each.

    Exact inverse-CDF sampling in two levels (which block of ``block`` entries,
    then which entry in it), so no cumulative sum runs over the whole
    vocabulary: one uniform per row instead of one random number per entry.
    """
    B, V = probs.shape
    nb = -(-V // block)
    p = jnp.pad(probs, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [B, nb]
    target = u * block_cdf[:, -1]
    blk = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), nb - 1)
    before = jnp.where(blk > 0, jnp.take_along_axis(block_cdf, jnp.maximum(blk - 1, 0)[:, None], 1)[:, 0], 0.0)
    inner = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]  # [B, block]
    idx = jnp.sum(before[:, None] + jnp.cumsum(inner, axis=-1) < target[:, None], axis=-1)
    # rounding can step past the block's last non-zero entry: never return a zero-probability index
    last = block - 1 - argmax_first((inner[:, ::-1] > 0).astype(jnp.int32))
    return (blk * block + jnp.minimum(idx, last)).astype(jnp.int32)


def _slot_key(seed, pos):
    """A slot's key for the token at ``pos``: depends on nothing but its seed and pos."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed[0]), seed[1])
    return jax.random.fold_in(key, pos)


def _draw_bisected(x, s: SlotSampling, u):
    """The general path: min-p, then top-k and top-p thresholds found by
    bisection over the whole vocabulary, then inverse-CDF sampling. Exact for
    any filters; several passes over [B, V] per bisection step."""
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    x = x / temp
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs >= s.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True), x, NEG)
    need_filter = jnp.any((s.temperature > 0) & ((s.top_k > 0) | (s.top_p < 1.0)))
    x = jax.lax.cond(need_filter, lambda z: filter_top_k_top_p(z, s), lambda z: z, x)
    return inverse_cdf(jax.nn.softmax(x, axis=-1), u)


def draw_filtered(x, s: SlotSampling, u) -> jax.Array:
    """One token per row from softmax(x / temperature) after min-p, top-k and
    top-p (x: raw logits [B, V]; u: one uniform per row). Rows at temperature 0
    get a value that the caller discards.

    A row whose filters keep only tokens among its N_CANDIDATES largest logits
    (top-k below that; or a nucleus reached within them) samples among those
    candidates, with the thresholds computed exactly on them (top-p's mass over
    the whole vocabulary needs one fused pass when no top-k bounds it). A row
    with no top-k or top-p (temperature, min-p) samples over the vocabulary in
    two levels without writing probabilities. Any other row (a nucleus or top-k
    reaching past the candidates, e.g. a flat distribution) takes the bisection
    path. Each part runs only when some row needs it, and a row's token depends
    only on its own logits, parameters and uniform."""
    B, V = x.shape
    temp = jnp.where(s.temperature > 0, s.temperature, 1.0)
    K = min(N_CANDIDATES, V)
    vals, ids = top_candidates(x, K)
    c = vals / temp[:, None]  # descending
    m, lowest = c[:, 0], c[:, K - 1]

    def inside(t):  # every token with x / temp >= t is a candidate
        return jnp.full(t.shape, True) if K == V else t > lowest

    k = s.top_k
    k_on = (k > 0) & (k < V)
    k_far = k_on & (k > K)  # top-k past the candidates
    t_k = jnp.where(k_on & ~k_far, jnp.take_along_axis(c, jnp.clip(k - 1, 0, K - 1)[:, None], 1)[:, 0], -jnp.inf)
    t_min = jnp.where(s.min_p > 0, m + jnp.log(jnp.where(s.min_p > 0, s.min_p, 1.0)), -jnp.inf)
    t1 = jnp.maximum(t_min, t_k)  # min-p and top-k; ties at a threshold are kept
    e = jnp.where(c >= t1[:, None], jnp.exp(c - m[:, None]), 0.0)
    p_on = s.top_p < 1.0
    sampling = s.temperature > 0
    # top-p is over the mass min-p and top-k keep in the whole vocabulary
    full_z = sampling & p_on & ~k_far & ~inside(t1)
    z = jnp.where(inside(t1), jnp.sum(e, axis=-1),
                  jax.lax.cond(jnp.any(full_z), lambda: kept_mass(x, temp, t1, m), lambda: jnp.ones((B,), F32)))
    reached = jnp.cumsum(e, axis=-1) >= (z * s.top_p * (1 - 1e-6))[:, None]
    any_reached = jnp.any(reached, axis=-1)
    n = argmax_first(reached.astype(jnp.int32))  # the nucleus: candidates [0, n], and ties of n
    t_p = jnp.where(p_on & any_reached, jnp.take_along_axis(c, n[:, None], 1)[:, 0], -jnp.inf)
    t = jnp.maximum(t1, t_p)
    resolved = ~k_far & (~p_on | any_reached) & inside(t)

    w = jnp.where(c >= t[:, None], e, 0.0)
    cdf = jnp.cumsum(w, axis=-1)
    idx = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
    last_kept = K - 1 - argmax_first((w[:, ::-1] > 0).astype(jnp.int32))
    tok_cand = jnp.take_along_axis(ids, jnp.minimum(idx, last_kept)[:, None], 1)[:, 0]

    plain = ~k_on & ~p_on  # temperature and min-p only: t1 is exact
    tok_full = jax.lax.cond(jnp.any(sampling & ~resolved & plain), lambda: draw_above(x, temp, t1, m, u),
                            lambda: jnp.zeros((B,), jnp.int32))
    tok_bisect = jax.lax.cond(jnp.any(sampling & ~resolved & ~plain), lambda: _draw_bisected(x, s, u),
                              lambda: jnp.zeros((B,), jnp.int32))
    return jnp.where(resolved, tok_cand, jnp.where(plain, tok_full, tok_bisect))


def sample(logits, s: SlotSampling, counts, seen, positions, *, greedy_only: bool = False,
           want_top=None) -> Sampled:
    """Sample one token per row. logits [B, V] f32 (raw model output); s, counts,
    seen: rows for these B sequences; positions [B]: position the sampled token
    will occupy (mixed into the slot's random key). ``greedy_only`` (static)
    compiles without the sampling code, for batches whose every row is greedy:
    on CPU its mere presence costs more than the rest of this function.
    ``want_top`` (a traced bool, or None for always): whether any row asked for
    the top-N alternatives; when false they are zeros and the top-k over the
    vocabulary is skipped at run time (same program either way). Penalties are
    skipped the same way when no row sets one.

    Log-probabilities are gathered as logit - logsumexp: no [B, V] array of
    them is ever written."""
    B, V = logits.shape
    m_raw, argmax_raw = max_argmax(logits)
    lse = logsumexp_from_max(logits, m_raw)
    n_top = min(MAX_TOP_LOGPROBS, V)

    def top(lg):
        v, i = top_candidates(lg, n_top)
        return v - lse[:, None], i

    if want_top is None:
        top_lp, top_ids = top(logits)
    else:
        top_lp, top_ids = jax.lax.cond(
            want_top, top, lambda lg: (jnp.zeros((B, n_top), F32), jnp.zeros((B, n_top), jnp.int32)), logits)
    penalised = jnp.any((s.repetition_penalty != 1.0) | (s.presence_penalty != 0.0) | (s.frequency_penalty != 0.0))

    def draw(x):
        u = jax.vmap(lambda k: jax.random.uniform(k, dtype=F32))(jax.vmap(_slot_key)(s.seed, positions))
        return draw_filtered(x, s, u)

    def pick(x, greedy_tok):
        # Greedy-only batches skip the sampling work entirely.
        if greedy_only:
            return greedy_tok
        sampled = jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda x: greedy_tok, x)
        return jnp.where(s.temperature > 0, sampled, greedy_tok)

    def with_penalties(lg):
        x = apply_penalties(lg, s, counts, seen)
        return pick(x, argmax_first(x))

    # Both branches return tokens, not logits: a branch returning its [B, V]
    # operand unchanged would copy it.
    token = jax.lax.cond(penalised, with_penalties, lambda lg: pick(lg, argmax_raw), logits)
    lp = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - lse
    return Sampled(token, lp, top_ids, top_lp)
