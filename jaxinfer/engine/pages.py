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
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig

POOL_AXES = ("layers", None, None, "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclass
class KVPool:
    k: jax.Array  # [L, num_pages + 1, page_size, G, Hd]
    v: jax.Array

    @staticmethod
    def shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
        return (cfg.num_layers, num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize

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
        pos = jnp.broadcast_to(jnp.arange(W * ps, dtype=jnp.int32), (B, W * ps))
        return k, v, pos, pos < self.length[:, None]

    def write(self, k, v) -> "PagedContext":
        """k, v [L, B, T, G, Hd]: every layer's new keys and values."""
        L, N, ps, G, Hd = self.pool.k.shape

        def put(pool, new):
            # unique_indices: XLA CPU then scatters in place; without it, it rewrote the whole pool on
            # every call (docs/engine.md). Only padding writes repeat a slot (the trash page's), and
            # which of them lands there does not matter.
            flat = pool.reshape(L, N * ps, G, Hd).at[:, self.write_at].set(new.astype(pool.dtype),
                                                                           unique_indices=True)
            return flat.reshape(pool.shape)

        return PagedContext(KVPool(put(self.pool.k, k), put(self.pool.v, v)), self.table, self.length, self.write_at)


def slots_of(table: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
    """Flat pool slots of positions [B, T] through tables [B, W]."""
    page = jnp.take_along_axis(table, positions // page_size, axis=1, mode="clip")
    return page * page_size + positions % page_size
