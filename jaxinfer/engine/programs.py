"""The engine's compiled functions, pure: prefill (with scoring) and decode.

Each takes the weights, the per-row decode state and the KV pool, and returns
the new state and pool (both donated) with its outputs. The model is one
:class:`~jaxinfer.model.transformer.Transformer` forward over a
:class:`~jaxinfer.engine.pages.PagedContext`; nothing here knows the host-side
bookkeeping (which rows and pages are whose).

* ``prefill``: P pieces of T tokens, each at its own offset ``start`` with its
  earlier positions read through a table of W pages (W = 0 for a fresh prompt).
  It samples each piece's next token and arms the piece's decode row. With
  ``want_scores`` (a traced flag, skipped at run time when off) it also returns
  the log-probability of given targets at every position of the first piece,
  with the greedy token and its log-probability there (the Score call).
* ``decode``: one step for Rb rows (any rows, by index; padding rows inactive),
  each reading its table of W pages; ``decode_k`` runs k of those in one
  device loop, feeding each step's tokens to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.engine.pages import KVPool, PagedContext, slots_of
from jaxinfer.engine.sampling import Sampled, SlotSampling, logsumexp_from_max, max_argmax, sample

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """What the device keeps per decode row between calls (donated each call)."""

    tokens: jax.Array  # i32 [R]: next decode input (the last sampled token)
    lengths: jax.Array  # i32 [R]: positions in the pool = position of the next token
    sampling: SlotSampling  # [R] each
    counts: jax.Array  # i32 [R, V]: generated-token counts (penalties)
    seen: jax.Array  # bool [R, V]: tokens in prompt or output (repetition penalty)

    @classmethod
    def zeros(cls, rows: int, vocab: int) -> "DecodeState":
        return cls(jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32), SlotSampling.zeros(rows),
                   jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), jnp.bool_))


@jax.tree_util.register_dataclass
@dataclass
class Scores:
    """Per position of the scored piece: log p(target), the greedy token and its log p."""

    logprob: jax.Array  # f32 [T]
    top_id: jax.Array  # i32 [T]
    top_logprob: jax.Array  # f32 [T]


def score_positions(model, hidden, targets, chunk: int) -> Scores:
    """hidden [T, D], targets [T] -> Scores, the logits made ``chunk`` positions
    at a time so that no [T, vocab] array exists."""
    T = hidden.shape[0]
    C = min(chunk, T)

    def one(args):
        h, t = args
        logits = model.logits(h)  # [C, V]
        m, top = max_argmax(logits)
        lse = logsumexp_from_max(logits, m)
        picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return picked - lse, top, m - lse

    lp, top, top_lp = jax.lax.map(one, (hidden.reshape(T // C, C, -1), targets.reshape(T // C, C)))
    return Scores(lp.reshape(T), top.reshape(T), top_lp.reshape(T))


def prefill(graphdef, params, ds: DecodeState, pool: KVPool, tokens, start, n, write_at, table, rows,
            samp: SlotSampling, last, fresh, targets, want_scores, *, score_chunk: int):
    """tokens, write_at [P, T]; start, n, rows, last, fresh [P]; table [P, W];
    targets [T] (for the first piece, used when want_scores). ``fresh``: the
    row's penalty state starts over (a prompt's first piece, or a piece after a
    cached prefix); else it carries on from the row's earlier piece. Padding
    pieces have n = 1, row R (out of range: their state writes are dropped) and
    trash slots."""
    model = nnx.merge(graphdef, params)
    P, T = tokens.shape
    R, V = ds.counts.shape
    idx = jnp.arange(T, dtype=jnp.int32)[None, :]
    valid = idx < n[:, None]
    positions = start[:, None] + idx
    hidden, ctx = model(tokens, positions, PagedContext(pool, table, start, write_at))

    last_h = jnp.take_along_axis(hidden, (n - 1)[:, None, None], axis=1)[:, 0]
    fresh = fresh[:, None]
    seen = jnp.where(fresh, False, jnp.take(ds.seen, rows, axis=0, mode="clip"))
    seen = seen.at[jnp.arange(P)[:, None], jnp.where(valid, tokens, V)].set(True, mode="drop")
    counts = jnp.where(fresh, 0, jnp.take(ds.counts, rows, axis=0, mode="clip"))
    out = sample(model.logits(last_h), samp, counts, seen, start + n)
    armed = jnp.where(last, rows, R)  # only a prompt's last piece arms its row
    counts = counts.at[jnp.arange(P), out.token].add(last.astype(jnp.int32))
    seen = seen.at[jnp.arange(P), out.token].set(seen[jnp.arange(P), out.token] | last)
    ds = DecodeState(
        tokens=ds.tokens.at[armed].set(out.token, mode="drop"),
        lengths=ds.lengths.at[armed].set(start + n, mode="drop"),
        sampling=jax.tree.map(lambda a, r: a.at[armed].set(r, mode="drop"), ds.sampling, samp),
        counts=ds.counts.at[rows].set(counts, mode="drop"),
        seen=ds.seen.at[rows].set(seen, mode="drop"),
    )
    empty = Scores(jnp.zeros((T,), F32), jnp.zeros((T,), jnp.int32), jnp.zeros((T,), F32))
    scores = jax.lax.cond(want_scores, lambda h: score_positions(model, h, targets, score_chunk),
                          lambda h: empty, hidden[0])
    return ds, ctx.pool, out, scores


def decode(graphdef, params, ds: DecodeState, pool: KVPool, rows, active, table, want_top, *, greedy_only: bool):
    """One step for rows [Rb] (active [Rb] bool; inactive rows write to the
    trash page and keep their state) through tables [Rb, W] that cover each
    row's next position."""
    model = nnx.merge(graphdef, params)
    R = ds.tokens.shape[0]
    rows = jnp.where(active, rows, R)
    take = lambda a: jnp.take(a, rows, axis=0, mode="clip")  # noqa: E731
    tokens, lengths = take(ds.tokens), take(ds.lengths)
    positions = lengths[:, None]
    write_at = jnp.where(active[:, None], slots_of(table, positions, pool.page_size), pool.trash_slot)
    hidden, ctx = model(tokens[:, None], positions, PagedContext(pool, table, lengths, write_at))
    counts, seen = take(ds.counts), take(ds.seen)
    out = sample(model.logits(hidden[:, 0]), jax.tree.map(take, ds.sampling), counts, seen, lengths + 1,
                 greedy_only=greedy_only, want_top=want_top)
    ds = DecodeState(
        tokens=ds.tokens.at[rows].set(out.token, mode="drop"),
        lengths=ds.lengths.at[rows].add(1, mode="drop"),
        sampling=ds.sampling,
        counts=ds.counts.at[rows, out.token].add(1, mode="drop"),
        seen=ds.seen.at[rows, out.token].set(True, mode="drop"),
    )
    return ds, ctx.pool, out


def decode_k(graphdef, params, ds, pool, rows, active, table, want_top, *, greedy_only: bool, steps: int):
    """``steps`` decode steps in one program (a device loop); outputs stacked on a leading [steps] axis."""
    def one(ds, pool):
        return decode(graphdef, params, ds, pool, rows, active, table, want_top, greedy_only=greedy_only)

    shapes = jax.eval_shape(one, ds, pool)[2]
    outs = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), shapes)

    def body(i, carry):
        ds, pool, outs = carry
        ds, pool, out = one(ds, pool)
        return ds, pool, jax.tree.map(lambda buf, o: buf.at[i].set(o), outs, out)

    return jax.lax.fori_loop(0, steps, body, (ds, pool, outs))


__all__ = ["DecodeState", "Scores", "Sampled", "prefill", "decode", "decode_k", "score_positions"]
