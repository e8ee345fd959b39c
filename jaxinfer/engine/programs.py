"""The engine's compiled functions, pure: the forwards and the heads.

Each takes the weights, the per-row decode state and the KV pool, and returns
the new state and pool (both donated) with its outputs. The model is one
:class:`~jaxinfer.model.transformer.Transformer` forward over a
:class:`~jaxinfer.engine.pages.PagedContext`; nothing here knows the host-side
bookkeeping (which rows and pages are whose).

The forwards (one program per shape bucket) write K/V and return hidden
states; the heads (one program per row count) turn them into tokens or
scores. The sampler is most of a program's compile time (on CPU about 9 s of
a SmolLM2 decode program's 13 s), so it lives in few programs, not in every
(rows, tokens, pages) variant.

* ``prefill``: P pieces of T tokens, each at its own offset ``start`` with its
  earlier positions read through a table of W pages (W = 0 for a fresh
  prompt); it arms the pieces' rows (length, sampling parameters, penalty
  state). ``sample_rows`` then samples the pieces that end a prompt.
* ``decode``: one step's forward for Rb rows (any rows, by index; padding
  rows inactive), each reading its table of W pages; ``sample_rows`` samples.
  ``decode_k`` runs k forward + sample steps in one device loop.
* ``score``: log p(target) at every position of a piece, from ``prefill``'s
  hidden states, with the greedy token and its log-probability.
"""

from __future__ import annotations

import dataclasses
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
            samp: SlotSampling, fresh):
    """The forward of P pieces: tokens, write_at [P, T]; start, n, rows, fresh
    [P]; table [P, W]. Writes the pieces' K/V and sets their rows' length
    (start + n), sampling parameters and penalty state: ``fresh`` starts the
    latter over (a prompt's first piece, or a piece after a cached prefix),
    else it carries on from the row's earlier piece. Padding pieces have n = 1,
    row R (out of range: their state writes are dropped) and trash slots.
    Returns the state, the pool, each piece's last hidden state [P, D] and the
    first piece's hidden states [T, D] (for scoring)."""
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
    ds = DecodeState(
        tokens=ds.tokens,
        lengths=ds.lengths.at[rows].set(start + n, mode="drop"),
        sampling=jax.tree.map(lambda a, r: a.at[rows].set(r, mode="drop"), ds.sampling, samp),
        counts=ds.counts.at[rows].set(counts, mode="drop"),
        seen=ds.seen.at[rows].set(seen, mode="drop"),
    )
    return ds, ctx.pool, last_h, hidden[0]


def decode(graphdef, params, ds: DecodeState, pool: KVPool, rows, active, table):
    """The forward of one decode step for rows [Rb] (active [Rb] bool; inactive
    rows write to the trash page and keep their state) through tables [Rb, W]
    covering each row's next position. Advances the rows' lengths; returns the
    state, the pool and the hidden states [Rb, D] for :func:`sample_rows`."""
    model = nnx.merge(graphdef, params)
    R = ds.tokens.shape[0]
    rows = jnp.where(active, rows, R)
    lengths = jnp.take(ds.lengths, rows, mode="clip")
    positions = lengths[:, None]
    write_at = jnp.where(active[:, None], slots_of(table, positions, pool.page_size), pool.trash_slot)
    tokens = jnp.take(ds.tokens, rows, mode="clip")[:, None]
    hidden, ctx = model(tokens, positions, PagedContext(pool, table, lengths, write_at))
    ds = dataclasses.replace(ds, lengths=ds.lengths.at[rows].add(1, mode="drop"))
    return ds, ctx.pool, hidden[:, 0]


def sample_rows(graphdef, params, ds: DecodeState, hidden, rows, active, want_top, *, greedy_only: bool):
    """Sample the next token of rows [B] from their hidden states [B, D] with
    their own parameters, make it their next decode input and count it.
    Inactive rows are sampled but change nothing. The random key of a row
    mixes its seed with its length (the position the token will occupy)."""
    model = nnx.merge(graphdef, params)
    R = ds.tokens.shape[0]
    rows = jnp.where(active, rows, R)
    take = lambda a: jnp.take(a, rows, axis=0, mode="clip")  # noqa: E731
    out = sample(model.logits(hidden), jax.tree.map(take, ds.sampling), take(ds.counts), take(ds.seen),
                 take(ds.lengths), greedy_only=greedy_only, want_top=want_top)
    ds = dataclasses.replace(
        ds,
        tokens=ds.tokens.at[rows].set(out.token, mode="drop"),
        counts=ds.counts.at[rows, out.token].add(1, mode="drop"),
        seen=ds.seen.at[rows, out.token].set(True, mode="drop"),
    )
    return ds, out


def score(graphdef, params, hidden, targets, *, chunk: int) -> Scores:
    """Scores of one piece from its hidden states [T, D] (``prefill``'s second output)."""
    return score_positions(nnx.merge(graphdef, params), hidden, targets, chunk)


def decode_k(graphdef, params, ds, pool, rows, active, table, want_top, *, greedy_only: bool, steps: int):
    """``steps`` decode steps (forward and sampling) in one program, a device
    loop; the outputs stacked on a leading [steps] axis."""
    def one(ds, pool):
        ds, pool, hidden = decode(graphdef, params, ds, pool, rows, active, table)
        ds, out = sample_rows(graphdef, params, ds, hidden, rows, active, want_top, greedy_only=greedy_only)
        return ds, pool, out

    shapes = jax.eval_shape(one, ds, pool)[2]
    outs = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), shapes)

    def body(i, carry):
        ds, pool, outs = carry
        ds, pool, out = one(ds, pool)
        return ds, pool, jax.tree.map(lambda buf, o: buf.at[i].set(o), outs, out)

    return jax.lax.fori_loop(0, steps, body, (ds, pool, outs))


__all__ = ["DecodeState", "Scores", "Sampled", "prefill", "decode", "sample_rows", "score", "decode_k"]
