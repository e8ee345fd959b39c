"""One decoder-only transformer (Flax NNX) for the Llama family and Gemma 3.

Differences between the families are :class:`~jaxinfer.config.ModelConfig`
fields (q/k norm, post norms, norm offset, activation, embedding scale, sliding
window layers, rope bases), never copies of this code.

The forward pass attends over the cached positions of each row (the first
``span`` of them) plus the new tokens, then writes the new tokens' keys and
values into the cache. Prefill (many tokens, few slots), chunked prefill (a
chunk at an offset), decode (one token, a prefix of the slots) and scoring (no
cache) are the same function with different shapes, so they cannot drift apart.
The plain call runs the layers under ``lax.scan`` over weights stacked on a
leading ``layers`` axis (the checkpoint layout). The engine's call unrolls them
over one buffer per layer, with the residual stream features-first ([D, tokens])
and every projection weight stored [out, in] (:func:`linear_t`), keys cached
transposed: the layouts XLA CPU runs fastest (scripts/experiments/bench_layouts.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.model.weights import flatten, nest, weight_specs

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Keys and values of every layer for every slot, preallocated once.

    Two layouts of the same numbers:

    * per layer, in blocks (what the engine allocates): ``k`` and ``v`` are
      lists over layers of lists over position blocks; a value buffer is
      ``[slots, kv_heads, block, head_dim]`` and a key buffer is transposed,
      ``[slots, kv_heads, head_dim, block]``, so that q.k^T is a plain
      [rows, head_dim] x [head_dim, block] product per slot and head (XLA CPU
      runs it about twice as fast as with keys [block, head_dim], and no
      transposed copy of the keys is made). The unrolled forward updates each
      block in place and attends to the blocks that cover the span. With block
      boundaries at the attended spans (128, 128, 256, 512, ... positions: the
      engine's choice on CPU), a span is read as whole buffers, never sliced
      out of a bigger one (XLA CPU copies such slices, at a fraction of the
      memory bandwidth). One block of ``max_len`` is the plain per-layer layout.
    * stacked: one ``[layers, slots, kv_heads, max_len, head_dim]`` array each,
      read inside the layer scan (the plain ``Transformer`` call).

    Kv heads sit before positions, so each head's keys are contiguous and the
    attention contractions need no transposes. A slot's entries at positions
    >= its current length are stale and never attended (the causal mask hides
    them); the engine tracks the lengths.
    """

    k: jax.Array | list[jax.Array]
    v: jax.Array | list[jax.Array]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (list, tuple))

    @property
    def dtype(self):
        return jax.tree.leaves(self.k)[0].dtype

    @property
    def num_slots(self) -> int:
        return jax.tree.leaves(self.k)[0].shape[-4]

    @property
    def max_len(self) -> int:
        if self.per_layer:
            return sum(b.shape[-2] for b in self.v[0])
        return self.k.shape[-2]

    @staticmethod
    def blocks_at(boundaries) -> tuple[int, ...]:
        """Block sizes with blocks ending at the given increasing positions
        (the last is max_len), e.g. spans (128, 256, 512) -> (128, 128, 256)."""
        edges = [0, *boundaries]
        return tuple(b - a for a, b in zip(edges, edges[1:]))

    @staticmethod
    def shape(cfg: ModelConfig, slots: int, max_len: int) -> tuple[int, ...]:
        """Shape of the stacked layout."""
        return (cfg.num_layers, *KVCache.layer_shape(cfg, slots, max_len))

    @staticmethod
    def layer_shape(cfg: ModelConfig, slots: int, max_len: int) -> tuple[int, ...]:
        """Shape of one layer's buffer."""
        return (slots, cfg.num_kv_heads, max_len, cfg.head_dim)

    @staticmethod
    def block_shape(cfg: ModelConfig, slots: int, n: int, keys: bool) -> tuple[int, ...]:
        """Shape of one per-layer block of n positions: keys transposed."""
        G, Hd = cfg.num_kv_heads, cfg.head_dim
        return (slots, G, Hd, n) if keys else (slots, G, n, Hd)

    @staticmethod
    def block_axes(keys: bool) -> tuple[str, ...]:
        return ("slots", "kv_heads", "head_dim", "seq") if keys else KVCache.layer_axes()

    @staticmethod
    def axes() -> tuple[str, ...]:
        return ("layers", *KVCache.layer_axes())

    @staticmethod
    def layer_axes() -> tuple[str, ...]:
        return ("slots", "kv_heads", "seq", "head_dim")

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, slots: int, max_len: int, dtype, sharding=None, *, blocks: tuple[int, ...] | None = None
    ) -> "KVCache":
        """Zeros in the stacked layout, or per layer in position blocks of the
        given sizes, summing to max_len (``sharding`` is then a function of a
        block's logical axes and shape)."""
        if blocks is None:
            make = jax.jit(lambda: jnp.zeros(cls.shape(cfg, slots, max_len), dtype), out_shardings=sharding)
            return cls(make(), make())
        if sum(blocks) != max_len:
            raise ValueError(f"cache blocks {blocks} do not add up to max_len={max_len}")
        makers = {}
        for n in set(blocks):
            for keys in (True, False):
                shape, axes = cls.block_shape(cfg, slots, n, keys), cls.block_axes(keys)
                makers[n, keys] = jax.jit(lambda shape=shape: jnp.zeros(shape, dtype),
                                          out_shardings=sharding(axes, shape) if sharding else None)
        return cls(*([[makers[n, keys]() for n in blocks] for _ in range(cfg.num_layers)] for keys in (True, False)))


# Decode over every row: attend block by block and skip, at run time, the blocks
# no row needs: past every row, or behind every row's sliding window (batch 32 at
# context 1030 on CPU, span 2048 in blocks of 128: 140.6 -> 122.0 ms per step). A
# module switch so the old path stays one edit away.
_SKIP_BLOCKS = True


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float, axis: int = -1) -> jax.Array:
    """RMSNorm over ``axis`` (-1, or 0 for features-first activations [D, N])."""
    x32 = x.astype(F32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
    w = w.astype(F32) if axis == -1 else w.astype(F32).reshape(w.shape + (1,) * (x.ndim - 1))
    return (y * (offset + w)).astype(x.dtype)


def linear_t(w: jax.Array, xt: jax.Array) -> jax.Array:
    """Features-first projection: w [*out, in] (output features first, the
    contracted axis last), xt [in, N] -> [*out, N].

    With the weight's contracted axis contiguous, XLA CPU reads a weight matrix
    at close to the memory bandwidth at one token and runs many tokens as one
    large-by-small product; both measured faster than x [N, in] @ w [in, out]
    (scripts/experiments/bench_layouts.py)."""
    out, n = w.shape[:-1], xt.shape[1]
    w = w.reshape(-1, w.shape[-1])  # free for a row-major buffer; a 2-D operand keeps XLA from relayouting it
    if n == 1:  # matrix-vector: the vector as the left operand
        y = jnp.einsum("ni,oi->no", xt.T, w).T
    else:
        y = jnp.einsum("oi,in->on", w, xt)
    return y.reshape(*out, n)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by factor, blend in between.
    lo_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    hi_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return np.where(mid, blended, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, head_dim] for positions [B, T] (computed once, shared by the layers)."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rope on x [B, T, heads, head_dim] with tables from :func:`rope_tables`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half rope. x: [B, T, heads, head_dim]; positions: [B, T]."""
    return rotate(x, *rope_tables(positions, inv_freq))


class Layers(nnx.Module):
    """Per-layer weights, each stacked over a leading ``layers`` axis."""


class Transformer(nnx.Module):
    """Decoder-only transformer; every weight comes from ``weight_specs(cfg)``.

    Build with random weights (``rngs``) or from a loaded nested weight dict
    (``params``, as ``jaxinfer.checkpoint`` returns it).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        params: dict | None = None,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
    ):
        self.cfg = cfg
        self.layers = Layers()
        specs = weight_specs(cfg)
        if params is None and rngs is None:
            raise ValueError("Transformer needs params or rngs")
        flat = None
        if params is not None:
            flat = flatten(params)
            missing = sorted(set(specs) - set(flat))
            extra = sorted(set(flat) - set(specs))
            if missing or extra:
                raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
        for name, spec in specs.items():
            if flat is not None:
                value = flat[name]
                if tuple(value.shape) != spec.shape:
                    raise ValueError(f"weight {name}: shape {tuple(value.shape)}, expected {spec.shape}")
            else:
                key = rngs.params()
                if spec.init == "norm":
                    base = 0.0 if cfg.norm_offset else 1.0
                    value = base + 0.1 * jax.random.normal(key, spec.shape, F32)
                else:
                    value = 0.02 * jax.random.normal(key, spec.shape, F32)
                value = value.astype(dtype)
            owner, _, leaf = name.rpartition("/")
            setattr(self.layers if owner == "layers" else self, leaf, nnx.Param(value, logical_axes=spec.axes))

    # --- pieces -----------------------------------------------------------

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        emb = self.embed[...]
        x = jnp.take(emb, tokens, axis=0)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits from final hidden states [..., D]."""
        if self.cfg.tie_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, self.embed[...], preferred_element_type=F32)
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head[...], preferred_element_type=F32)

    # --- forward ----------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None,
        slots: jax.Array | None,
        span: int,
        unroll: int | bool = 1,
        layer_params: list[dict] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Run the decoder over new tokens and return final-normed hidden states.

        tokens, positions: [B, T] int32; each row's positions are consecutive from
          its first. Positions past the row's real tokens are padding: set them to
          an out-of-range value (>= cache.max_len) so nothing is written for them.
        cache: the KV cache, or None to attend only among the new tokens (scoring).
        slots: [B] int32 cache rows of the B sequences; None means the first B
          slots in order (decode over a prefix of the slots).
        span: static; attention reads cache positions [0, span) of each row. With
          the stacked cache it uses those before the row's first new position
          (attending the new tokens directly) and must cover them. With the
          per-layer cache the new keys are written first and everything is read
          from the cache, so span must cover the new tokens' positions too.
        layer_params: None runs the layers under ``lax.scan`` over the stacked
          weights (with a stacked cache). A list of per-layer weight dicts in
          the transposed layout (what :func:`transposed_layer` returns) unrolls
          the layers over those separate buffers (with a per-layer cache),
          features-first. Unrolled compiles slower but runs
          faster: a scan reads each layer's weights through a dynamic slice,
          which XLA CPU materialises, copying every weight on every call.
        Returns hidden [B, T, D] and the cache with the new keys/values written.

        Under scan the cache is read inside the loop but written once after it,
        so the (donated) cache is updated in place rather than copied per layer.
        """
        cfg = self.cfg
        if cache is not None and cache.per_layer != (layer_params is not None):
            raise ValueError("a per-layer KV cache goes with per-layer weights, a stacked one with the scan")
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        G, R, Hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        is_local = jnp.array([k == "local" for k in cfg.layer_kinds])
        inv_global = jnp.asarray(rope_inv_freq(Hd, cfg.rope_theta, cfg.rope_scaling))
        inv_local = jnp.asarray(rope_inv_freq(Hd, cfg.local_theta, None))
        rope_global = rope_tables(positions, inv_global)
        rope_local = rope_tables(positions, inv_local) if "local" in cfg.layer_kinds else rope_global
        window = cfg.sliding_window or 0
        use_cache = cache is not None and span > 0
        # per-layer cache: write the new keys first, then attend only to the cache
        cache_only = cache is not None and cache.per_layer
        if cache_only and span <= 0:
            raise ValueError("the per-layer cache path needs span > 0 (covering the new positions)")
        kv_dtype = cache.dtype if cache is not None else x.dtype

        # Masks shared by every layer. Old keys: cache positions before the row's
        # first new token. New keys: causal among the new tokens.
        tq = jnp.arange(T, dtype=jnp.int32)
        new_mask = (tq[:, None] >= tq[None, :])[None]  # [1, T, T]
        new_win = positions[:, :, None] - positions[:, None, :] < window if window else None
        if use_cache:
            kpos = jnp.arange(span, dtype=jnp.int32)[None, None, :]
            old_mask = kpos < positions[:, :1, None]  # [B, 1, span]
            old_win = kpos > positions[:, :, None] - window if window else None
            if cache_only:  # causal over cache positions; stale entries lie past each query
                old_mask = kpos <= positions[:, :, None]  # [B, T, span]

        rows = (jnp.arange(B, dtype=jnp.int32) if slots is None else slots)[:, None]
        if cache_only:
            sizes = [b.shape[-2] for b in cache.v[0]]
            starts = np.cumsum([0, *sizes])[:-1].tolist()
            n_read = sum(1 for st in starts if st < span)  # blocks holding positions [0, span)
            # the last block read may be partly covered: read (and slice) just that part
            read_sizes = [min(n, span - st) for st, n in zip(starts[:n_read], sizes[:n_read])]

        def write_blocks(blocks, new, c, keys):
            """Scatter new keys or values [B, T, G, Hd] into the blocks that can hold them."""
            positions, rows = c["positions"], c["rows"]
            out = list(blocks)
            for j in range(n_read):
                local = positions - starts[j]
                local = jnp.where((local >= 0) & (local < sizes[j]), local, sizes[j])  # elsewhere: dropped
                # indices split by slices: the [B, T] index dims come first in the update either way
                at = blocks[j].at[rows, :, :, local] if keys else blocks[j].at[rows, :, local]
                out[j] = at.set(new, mode="drop")
            return out

        def read_block(b, n, slots, keys):
            """These rows' first n positions, [B, G, Hd, n] (keys) or [B, G, n, Hd]:
            the whole buffer when every slot and position is read (no copy), else
            a slice or a gather."""
            if n < b.shape[3 if keys else 2]:
                b = b[..., :n] if keys else b[:, :, :n]
            if slots is not None:
                return b[slots]
            return b if B == b.shape[0] else b[:B]

        def read_cache(c, idx):
            """[B, G, span, Hd]: kv heads before positions, so each head's keys are
            contiguous and the attention contractions need no transposes."""
            if slots is None:
                return lax.dynamic_slice(c, (idx, 0, 0, 0, 0), (1, B, G, span, Hd))[0]
            return c[idx, slots, :, :span]  # a gather of just these rows

        def skip_blocks(qg, keys, vals, m_old, limit, low):
            """Attention over the blocks one at a time with a running softmax. A
            block no row can see is skipped at run time (``lax.cond``): one that
            starts at or past ``limit`` (no row has reached it), or, in a
            sliding-window layer, one that ends at or before ``low`` (behind
            every row's window). A step reads the blocks its rows need, not the
            whole static span."""
            def scores(j):
                st, n = starts[j], read_sizes[j]
                s = jnp.einsum("btgrk,bgks->bgtrs", qg, keys[j].astype(qg.dtype), preferred_element_type=F32)
                return jnp.where(m_old[:, None, :, None, st : st + n], s * cfg.attn_scale, -1e30)

            B_, T_, G_, R_, Hd_ = qg.shape
            carry = (jnp.full((B_, G_, T_, R_), -1e30, F32), jnp.zeros((B_, G_, T_, R_), F32),
                     jnp.zeros((B_, G_, T_, R_, Hd_), F32))
            for j in range(len(keys)):
                def update(carry, j=j):
                    m, total, acc = carry
                    s = scores(j)
                    m_new = jnp.maximum(m, s.max(-1))
                    corr = jnp.exp(m - m_new)  # 0 once a real score replaces the -1e30 start
                    p = jnp.exp(s - m_new[..., None])
                    pv = jnp.einsum("bgtrs,bgsk->bgtrk", p.astype(vals[j].dtype), vals[j], preferred_element_type=F32)
                    return m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv

                live = starts[j] < limit
                if low is not None:
                    live = live & (starts[j] + read_sizes[j] > low)
                carry = lax.cond(live, update, lambda c: c, carry)
            _, total, acc = carry
            return acc / jnp.where(total > 0, total, 1.0)[..., None]  # no live block: no row decodes

        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        ctx = dict(positions=positions, slots=slots, rows=rows, new_mask=new_mask, new_win=new_win,
                   old_mask=old_mask if use_cache else None, old_win=old_win if use_cache else None,
                   rope_local=rope_local, rope_global=rope_global)
        if cache_only:  # one past the last position any row writes (padding sits at >= max_len)
            valid = positions < cache.max_len
            ctx["kv_limit"] = jnp.max(jnp.where(valid, positions, -1)) + 1
            if window:  # the first position any row's window still sees
                ctx["kv_low"] = jnp.min(jnp.where(valid, positions, cache.max_len)) - window + 1
        weights = None if layer_params is not None else {
            k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)
        }

        H = cfg.num_heads

        def layer(x, xs, bufs=None, c=None, t=False):
            """One layer. Under scan, reads layer ``idx`` of the stacked cache and
            returns the new keys/values; unrolled, gets this layer's own buffers
            ``bufs``, writes the new keys/values first and then reads them back
            (the read depends on the write, so XLA updates in place, no copy).
            ``c`` holds the per-call arrays (positions, masks, rope tables).
            ``t``: features-first -- x is [D, B*T] and the weights are the
            engine's transposed ones (names ending ``_t``, see :func:`linear_t`)."""
            p, idx, local = xs
            c = c or ctx
            positions, slots = c["positions"], c["slots"]
            new_mask, new_win, old_mask, old_win = c["new_mask"], c["new_win"], c["old_mask"], c["old_win"]
            rope_local, rope_global = c["rope_local"], c["rope_global"]
            window_static = bool(window) and local is True  # unrolled: a static bool per layer
            local = jnp.asarray(local)
            ax = 0 if t else -1
            h = rms_norm(x, p["attn_norm"], eps, off, ax)
            if t:
                def tokens_first(a):  # [heads, Hd, B*T] -> [B, T, heads, Hd]
                    return a.reshape(a.shape[0], Hd, B, T).transpose(2, 3, 0, 1)

                if "wqkv_t" in p:  # [heads + 2 kv_heads, Hd, D]: one matmul
                    qkv = tokens_first(linear_t(p["wqkv_t"], h))
                    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + G], qkv[:, :, H + G :]
                else:
                    q, k, v = (tokens_first(linear_t(p[n], h)) for n in ("wq_t", "wk_t", "wv_t"))
            else:
                q = jnp.einsum("btd,dhk->bthk", h, p["wq"])
                k = jnp.einsum("btd,dgk->btgk", h, p["wk"])
                v = jnp.einsum("btd,dgk->btgk", h, p["wv"])
            if cfg.attention_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            if cfg.qk_norm:
                q = rms_norm(q, p["q_norm"], eps, off)
                k = rms_norm(k, p["k_norm"], eps, off)
            cos, sin = (jnp.where(local, a, b) for a, b in zip(rope_local, rope_global))
            q = rotate(q, cos, sin)
            k = rotate(k, cos, sin).astype(kv_dtype)
            v = v.astype(kv_dtype)
            qg = q.reshape(B, T, G, R, Hd)

            # Layouts [b, g, t, r, s] keep t before r as in q: XLA CPU runs these
            # contractions several times faster than with [b, g, r, t, s].
            def scores_of(keys, mask, spec):
                s = jnp.einsum(spec, qg, keys.astype(q.dtype), preferred_element_type=F32)
                return jnp.where(mask[:, None, :, None, :], s * cfg.attn_scale, -1e30)

            if cache_only:  # write, then one softmax over [0, span) of the updated blocks
                bufs = (write_blocks(bufs[0], k, c, True), write_blocks(bufs[1], v, c, False))
                keys = [read_block(b, n, slots, True) for b, n in zip(bufs[0], read_sizes)]  # each [B, G, Hd, n]
                vals = [read_block(b, n, slots, False) for b, n in zip(bufs[1], read_sizes)]  # each [B, G, n, Hd]
                m_old = old_mask & (old_win | ~local) if window else old_mask
                # only where every block is read whole: over a slice or gather of the rows, XLA
                # CPU fuses the read into the cache write and copies each whole block per cond
                if _SKIP_BLOCKS and len(keys) > 1 and slots is None and B == bufs[0][0].shape[0]:
                    attn = skip_blocks(qg, keys, vals, m_old, c["kv_limit"], c["kv_low"] if window_static else None)
                else:
                    raw = [jnp.einsum("btgrk,bgks->bgtrs", qg, kb.astype(q.dtype), preferred_element_type=F32)
                           for kb in keys]
                    s_all = raw[0] if len(raw) == 1 else jnp.concatenate(raw, axis=-1)
                    probs = jax.nn.softmax(jnp.where(m_old[:, None, :, None, :], s_all * cfg.attn_scale, -1e30),
                                           axis=-1)
                    attn = sum(
                        jnp.einsum("bgtrs,bgsk->bgtrk", probs[..., st : st + n].astype(vb.dtype), vb,
                                   preferred_element_type=F32)
                        for st, n, vb in zip(starts, read_sizes, vals)
                    )
            else:
                m_new = new_mask & (new_win | ~local) if window else new_mask
                parts = [scores_of(k, m_new, "btgrk,bsgk->bgtrs")]
                if use_cache:
                    keys, vals = read_cache(cache.k, idx), read_cache(cache.v, idx)  # [B, G, span, Hd]
                    m_old = old_mask & (old_win | ~local) if window else old_mask
                    parts.insert(0, scores_of(keys, m_old, "btgrk,bgsk->bgtrs"))
                probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)
                attn = jnp.einsum(
                    "bgtrs,bsgk->bgtrk", probs[..., -T:].astype(v.dtype), v, preferred_element_type=F32
                )
                if use_cache:
                    attn += jnp.einsum(
                        "bgtrs,bgsk->bgtrk", probs[..., :span].astype(vals.dtype), vals, preferred_element_type=F32
                    )
            if t:  # attn [B, G, T, R, Hd] -> [H * Hd, B * T]
                wo = p["wo_t"]  # [D, H, Hd]: the contracted axes are contiguous, the reshape is free
                attn = attn.transpose(1, 3, 4, 0, 2).reshape(H * Hd, B * T).astype(x.dtype)
                out = linear_t(wo.reshape(wo.shape[0], -1), attn)
            else:
                attn = attn.transpose(0, 2, 1, 3, 4).reshape(B, T, H, Hd).astype(x.dtype)
                out = jnp.einsum("bthk,hkd->btd", attn, p["wo"])
            if cfg.post_norms:
                out = rms_norm(out, p["post_attn_norm"], eps, off, ax)
            x = x + out
            h = rms_norm(x, p["mlp_norm"], eps, off, ax)
            if t:  # [F, 2, D]: gate and up as one matmul (F first keeps its sharding when merged with 2)
                gu = linear_t(p["w_gate_up_t"], h)
                gate, up = gu[:, 0], gu[:, 1]
            else:
                gate = jnp.einsum("btd,df->btf", h, p["w_gate"])
                up = jnp.einsum("btd,df->btf", h, p["w_up"])
            act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
            if t:
                out = linear_t(p["w_down_t"], act * up)
            else:
                out = jnp.einsum("btf,fd->btd", act * up, p["w_down"])
            if cfg.post_norms:
                out = rms_norm(out, p["post_mlp_norm"], eps, off, ax)
            return x + out, (k, v) if bufs is None else bufs

        if layer_params is None:
            idxs = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            x, (ks, vs) = lax.scan(layer, x, (weights, idxs, is_local), unroll=unroll)  # ks: [L, B, T, G, Hd]
            x = rms_norm(x, self.final_norm[...], eps, off)
            if cache is None:
                return x, None
            # indices split by a slice: numpy puts the broadcast [B, T] dims first
            cache = KVCache(
                cache.k.at[:, rows, :, positions].set(ks.transpose(1, 2, 0, 3, 4), mode="drop"),
                cache.v.at[:, rows, :, positions].set(vs.transpose(1, 2, 0, 3, 4), mode="drop"),
            )
            return x, cache
        # Unrolled over separate per-layer weights and cache buffers: no layer
        # slice of a stacked array is ever taken, so none is copied.
        # Each layer is a nested jit (one per layer kind): traced and lowered once,
        # called for every layer, so tracing time does not grow with depth.
        # The residual stream runs features-first, [D, B*T] (see linear_t).
        layer_jit = jax.jit(lambda x, p, bufs, c, local: layer(x, (p, None, local), bufs, c, True), static_argnums=4)
        x = x.reshape(B * T, -1).T
        new_k, new_v = [], []
        for i, p in enumerate(layer_params):
            bufs = None if cache is None else (cache.k[i], cache.v[i])
            x, (k, v) = layer_jit(x, p, bufs, ctx, cfg.layer_kinds[i] == "local")
            new_k.append(k)
            new_v.append(v)
        x = rms_norm(x.T.reshape(B, T, -1), self.final_norm[...], eps, off)
        return x, (KVCache(new_k, new_v) if cache is not None else None)


def split_layers(stacked: dict, shardings: dict | None = None) -> list[dict]:
    """Per-layer weight dicts (separate buffers) from weights stacked on a
    leading layers axis; ``shardings`` (name -> sharding of one layer's weight)
    places each one."""
    num = len(next(iter(stacked.values())))
    out = []
    for i in range(num):
        layer = {}
        for name, w in stacked.items():
            piece = w[i]
            layer[name] = jax.device_put(piece, shardings[name]) if shardings else piece
        out.append(layer)
    return out


def params_tree(model: Transformer) -> dict:
    """The model's weights as a plain nested dict (checkpoint layout)."""
    flat = {}
    for name in weight_specs(model.cfg):
        owner, _, leaf = name.rpartition("/")
        flat[name] = getattr(model.layers if owner == "layers" else model, leaf)[...]
    return nest(flat)
