"""One decoder-only transformer (Flax NNX) for the Llama family and Gemma 3.

Differences between the families are :class:`~jaxinfer.config.ModelConfig`
fields (q/k norm, post norms, norm offset, activation, embedding scale, sliding
window layers, rope bases), never copies of this code.

The forward pass always goes through the KV cache: each layer writes the new
tokens' keys and values at their positions in their slots, then attends over
the first ``span`` positions of those slots. Prefill (many tokens, few slots),
chunked prefill (a chunk at an offset) and decode (one token, every slot) are
the same function with different shapes, so they cannot drift apart.
Layers run under ``lax.scan`` over weights stacked on a leading ``layers`` axis,
which keeps compile time flat in depth.
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
from jaxinfer.model.weights import nest, weight_specs

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Keys and values of every layer for every slot, preallocated once.

    A slot's entries at positions >= its current length are stale and never
    attended (the causal mask hides them); the engine tracks the lengths.
    """

    k: jax.Array  # [layers, slots, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, slots, max_len, kv_heads, head_dim]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @staticmethod
    def shape(cfg: ModelConfig, slots: int, max_len: int) -> tuple[int, ...]:
        return (cfg.num_layers, slots, max_len, cfg.num_kv_heads, cfg.head_dim)

    @staticmethod
    def axes() -> tuple[str, ...]:
        return ("layers", "slots", "seq", "kv_heads", "head_dim")

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int, dtype, sharding=None) -> "KVCache":
        shape = cls.shape(cfg, slots, max_len)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(make(), make())


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float) -> jax.Array:
    x32 = x.astype(F32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + w.astype(F32))).astype(x.dtype)


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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half rope. x: [B, T, heads, head_dim]; positions: [B, T]."""
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, head_dim/2]
    cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


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
            from jaxinfer.model.weights import flatten

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
        cache: KVCache,
        slots: jax.Array | None,
        span: int,
        unroll: int | bool = 1,
    ) -> tuple[jax.Array, KVCache]:
        """Run the decoder over new tokens and return final-normed hidden states.

        tokens, positions: [B, T] int32. A position >= cache.max_len marks padding:
          its keys/values are not written.
        slots: [B] int32 cache rows of the B sequences; None means the first B
          slots in order (decode over a prefix of the slots).
        span: static; attention reads cache positions [0, span). Every real
          position must be < span.
        Returns hidden [B, T, D] and the updated cache.
        """
        cfg = self.cfg
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        slot_rows = jnp.arange(B, dtype=jnp.int32) if slots is None else slots
        G, R = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        kinds = cfg.layer_kinds
        is_local = jnp.array([k == "local" for k in kinds])
        inv_global = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        inv_local = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.local_theta, None))
        window = cfg.sliding_window or 0
        kpos = jnp.arange(span, dtype=jnp.int32)
        causal = kpos[None, None, :] <= positions[:, :, None]  # [B, T, span]
        if window:
            in_window = kpos[None, None, :] > positions[:, :, None] - window
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        weights = {k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}

        def layer(carry, xs):
            x, ck, cv = carry
            p, idx, local = xs
            h = rms_norm(x, p["attn_norm"], eps, off)
            q = jnp.einsum("btd,dhk->bthk", h, p["wq"])
            k = jnp.einsum("btd,dgk->btgk", h, p["wk"])
            v = jnp.einsum("btd,dgk->btgk", h, p["wv"])
            if cfg.attention_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            if cfg.qk_norm:
                q = rms_norm(q, p["q_norm"], eps, off)
                k = rms_norm(k, p["k_norm"], eps, off)
            inv = jnp.where(local, inv_local, inv_global)
            q = apply_rope(q, positions, inv)
            k = apply_rope(k, positions, inv)
            ck = ck.at[idx, slot_rows[:, None], positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[idx, slot_rows[:, None], positions].set(v.astype(cv.dtype), mode="drop")
            # Read only [0, span) of this layer: slicing after indexing would copy the whole layer.
            rows = ck.shape[1] if slots is not None else B  # decode: the first B slots
            keys = lax.dynamic_slice(ck, (idx, 0, 0, 0, 0), (1, rows, span, *ck.shape[3:]))[0]
            vals = lax.dynamic_slice(cv, (idx, 0, 0, 0, 0), (1, rows, span, *cv.shape[3:]))[0]
            if slots is not None:
                keys, vals = keys[slots], vals[slots]  # [B, span, G, Hd]
            mask = causal & (in_window | ~local) if window else causal
            qg = q.reshape(B, T, G, R, cfg.head_dim)
            scores = jnp.einsum("btgrk,bsgk->bgrts", qg, keys.astype(q.dtype), preferred_element_type=F32)
            scores = scores * cfg.attn_scale
            scores = jnp.where(mask[:, None, None], scores, -1e30)
            probs = jax.nn.softmax(scores, axis=-1)
            attn = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(vals.dtype), vals, preferred_element_type=F32)
            attn = attn.reshape(B, T, cfg.num_heads, cfg.head_dim).astype(x.dtype)
            out = jnp.einsum("bthk,hkd->btd", attn, p["wo"])
            if cfg.post_norms:
                out = rms_norm(out, p["post_attn_norm"], eps, off)
            x = x + out
            h = rms_norm(x, p["mlp_norm"], eps, off)
            gate = jnp.einsum("btd,df->btf", h, p["w_gate"])
            up = jnp.einsum("btd,df->btf", h, p["w_up"])
            act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
            out = jnp.einsum("btf,fd->btd", act * up, p["w_down"])
            if cfg.post_norms:
                out = rms_norm(out, p["post_mlp_norm"], eps, off)
            return (x + out, ck, cv), None

        idxs = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, ck, cv), _ = lax.scan(layer, (x, cache.k, cache.v), (weights, idxs, is_local), unroll=unroll)
        x = rms_norm(x, self.final_norm[...], eps, off)
        return x, KVCache(ck, cv)


def params_tree(model: Transformer) -> dict:
    """The model's weights as a plain nested dict (checkpoint layout)."""
    flat = {}
    for name in weight_specs(model.cfg):
        owner, _, leaf = name.rpartition("/")
        flat[name] = getattr(model.layers if owner == "layers" else model, leaf)[...]
    return nest(flat)
