"""The paged KV pool and attention's view of it through page tables.

One pool holds every layer's keys and values: ``k`` and ``v`` are each
``[layers, num_pages + 1, page_size, kv_heads, head_dim]``, preallocated once
and donated to every call. Page ``num_pages`` is the engine's own trash page:
writes of padding tokens and of idle decode rows land there, so no program
needs a data-dependent branch to skip them. A sequence's page table lists the
pages of its positions 0, 1, ... in order, ``page_size`` positions each; the
pages may be any ids in any order (the block manager decides).

:class:`PagedContext` is the model's :class:`~jaxinfer.model.transformer.KVContext`
over the pool: ``read`` gathers each row's pages (``[B, W]`` table -> ``[B, W *
page_size]`` positions) and marks positions at or past the row's length
invalid; ``write`` scatters the new tokens' keys and values into the flat
slots (``page * page_size + offset``) the caller computed. Both are plain XLA
gathers and scatters, portable to every backend.

The pool cannot be split by sequence (every sequence may use any page), so it
shards only over kv heads (``model``, where they divide) and is replicated
over ``data``; decode rows shard over ``data``.

An int8 pool (``cache_dtype`` int8) holds ``k`` and ``v`` as int8 beside a
scale per token and kv head, ``k_scale`` and ``v_scale`` ``[layers, num_pages
+ 1, page_size, kv_heads]``, sharded like the pool. Quantization is symmetric:
a head's ``head_dim`` values share ``scale = absmax / 127`` and are stored as
``round(x / scale)``. ``write`` quantizes the new keys and values; ``read``
dequantizes the gathered ones inside the jitted forward (XLA fuses the
conversion into the gather), so attention computes in float as before.

Keys are held rotated: ``k @ R`` for a fixed orthogonal ``R`` of ``head_dim``
(a normalized Hadamard matrix where ``head_dim`` is a power of two). Keys have
a few channels far larger than the rest (SmolLM2's most of all); per-token
absmax scaling then leaves the other channels a handful of steps, and keys
were most of the perplexity an int8 pool cost (docs/quantization.md).
``R`` spreads each channel over all of them. Attention needs only ``q . k``,
and ``(q @ R) . (k @ R) = q . k``, so the queries are rotated instead of the
keys being rotated back: one ``head_dim`` square matmul per query, nothing
per key read. Values are held unrotated (their error was small).

The new tokens attend to their own keys and values through the same round
trip (``stored``), so a position's result does not depend on whether its
earlier keys came from the pool (a later chunk, a prefix-cache hit, decode, a
recompute after preemption) or from the same call.

The scales are float32: they are a small part of a token's bytes (4 per
``head_dim`` int8 values), bfloat16 would round each scale by up to 2**-9 (a
systematic error on every value of the head, of the order of the int8
rounding itself), and on a CPU, which has no bfloat16 arithmetic, the
multiply is float32 anyway. A float pool has no scales (``None``) and runs
exactly the ops it ran before int8 existed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig

POOL_AXES = ("layers", None, None, "kv_heads", "head_dim")
SCALE_AXES = POOL_AXES[:-1]  # int8 pools: a scale per token and kv head
INT8 = jnp.dtype(jnp.int8)
SCALE_DTYPE = jnp.dtype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclass
class KVPool:
    k: jax.Array  # [L, num_pages + 1, page_size, G, Hd]
    v: jax.Array
    k_scale: jax.Array | None = None  # f32 [L, num_pages + 1, page_size, G]: int8 pools only
    v_scale: jax.Array | None = None

    @staticmethod
    def shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
        return (cfg.num_layers, num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        """Pool bytes one token takes: its keys and values, and for int8 their scales."""
        n = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
        if jnp.dtype(dtype) == INT8:
            n += 2 * cfg.num_layers * cfg.num_kv_heads * SCALE_DTYPE.itemsize
        return n

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

    @property
    def num_pages(self) -> int:
        return self.k.shape[1] - 1

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def trash_slot(self) -> int:
        """Flat slot of the trash page's first position."""
        return self.num_pages * self.page_size


@jax.tree_util.register_dataclass
@dataclass
class PagedContext:
    """Earlier positions of B rows, read through their page tables."""

    pool: KVPool
    table: jax.Array  # i32 [B, W]: page ids of each row's positions 0 .. W * page_size - 1
    length: jax.Array  # i32 [B]: positions already in the pool (read: those < length)
    write_at: jax.Array  # i32 [B, T]: flat slot of each new token (the trash page for padding)

    def read(self, layer):
        L, _, ps, G, Hd = self.pool.k.shape
        B, W = self.table.shape
        k = self.pool.k[layer, self.table].reshape(B, W * ps, G, Hd)
        v = self.pool.v[layer, self.table].reshape(B, W * ps, G, Hd)
        if self.pool.quantized:
            k = dequantize(k, self.pool.k_scale[layer, self.table].reshape(B, W * ps, G))
            v = dequantize(v, self.pool.v_scale[layer, self.table].reshape(B, W * ps, G))
        pos = jnp.broadcast_to(jnp.arange(W * ps, dtype=jnp.int32), (B, W * ps))
        return k, v, pos, pos < self.length[:, None]

    def stored(self, q, k, v):
        """The new tokens' queries, keys and values as attention compares them with
        what ``read`` gives: unchanged for a float pool (its dtype is not applied,
        as before int8 existed); for an int8 one the queries rotated, the keys
        rotated and through the int8 round trip, the values through the round trip."""
        if not self.pool.quantized:
            return q, k, v
        return rotate_heads(q), dequantize(*quantize(rotate_heads(k))), dequantize(*quantize(v))

    def write(self, k, v) -> "PagedContext":
        """k, v [L, B, T, G, Hd]: every layer's new keys and values."""
        L, N, ps = self.pool.k.shape[:3]

        def put(pool, new):
            # unique_indices: XLA CPU then scatters in place; without it, it rewrote the whole pool on
            # every call (docs/engine.md). Only padding writes repeat a slot (the trash page's), and
            # which of them lands there does not matter.
            flat = pool.reshape(L, N * ps, *pool.shape[3:]).at[:, self.write_at].set(new.astype(pool.dtype),
                                                                                     unique_indices=True)
            return flat.reshape(pool.shape)

        if self.pool.quantized:
            (qk, sk), (qv, sv) = quantize(rotate_heads(k)), quantize(v)
            pool = KVPool(put(self.pool.k, qk), put(self.pool.v, qv), put(self.pool.k_scale, sk),
                          put(self.pool.v_scale, sv))
        else:
            pool = KVPool(put(self.pool.k, k), put(self.pool.v, v))
        return PagedContext(pool, self.table, self.length, self.write_at)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., Hd] -> (int8 [..., Hd], float32 scale [...]): symmetric, absmax / 127
    per vector; an all-zero vector gets scale 0 (and dequantizes to zeros)."""
    x32 = x.astype(SCALE_DTYPE)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(INT8), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 [..., Hd] and scale [...] -> float32 [..., Hd]."""
    return q.astype(SCALE_DTYPE) * scale[..., None]


@functools.lru_cache(maxsize=None)
def rotation(n: int) -> np.ndarray:
    """A fixed orthogonal float32 [n, n]: the normalized Hadamard matrix (Sylvester's, symmetric)
    where n is a power of two, else the Q of a seeded Gaussian matrix's QR."""
    if n & (n - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return (h / np.sqrt(n)).astype(np.float32)
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def rotate_heads(x: jax.Array) -> jax.Array:
    """x [..., Hd] @ rotation(Hd), in float32; float32 out."""
    return jnp.einsum("...k,kj->...j", x.astype(SCALE_DTYPE), jnp.asarray(rotation(x.shape[-1])),
                      precision=jax.lax.Precision.HIGHEST)


def slots_of(table: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
    """Flat pool slots of positions [B, T] through tables [B, W]."""
    page = jnp.take_along_axis(table, positions // page_size, axis=1, mode="clip")
    return page * page_size + positions % page_size
