"""One decoder-only transformer (Flax NNX) for the Llama family and Gemma 3.

Differences between the families are :class:`~jaxinfer.config.ModelConfig`
fields (q/k norm, post norms, norm offset, activation, embedding scale,
sliding-window layers, rope bases), never copies of this code.

Activations are tokens-first, ``[B, T, D]``. The layers run under
``lax.scan`` over weights stacked on a leading ``layers`` axis (the
checkpoint layout, :mod:`jaxinfer.model.weights`). Attention sees the new
tokens plus, when a :class:`KVContext` is given, the keys and values of earlier
positions that the context reads for each layer (the engine's paged KV pool).
The new tokens' keys and values are returned from the scan and handed to the
context once, after the last layer, to be written. Prefill, chunked prefill at
an offset, decode and scoring are this one function with different shapes.
"""

from __future__ import annotations

import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.model import quant as qt
from jaxinfer.model.weights import flatten, nest, tensor_format, weight_specs

F32 = jnp.float32
NEG = -1e30


class KVContext(Protocol):
    """Keys and values of the positions before the new tokens (a KV cache).

    ``read(layer)`` gives that layer's earlier keys and values ``[B, S, kv_heads,
    head_dim]`` with their positions ``[B, S]`` and a validity mask ``[B, S]``;
    ``write(k, v)`` takes every layer's new keys and values ``[L, B, T,
    kv_heads, head_dim]`` and returns the updated context; ``stored(q, k, v)``
    gives one layer's new queries, keys and values as attention compares them
    with what ``read`` gives (the same arrays for a float cache; for an int8 one
    as the cache holds them, so that the new tokens attend to what every later
    token will see, in the basis the cache holds keys in). It is a pytree, so
    it passes through ``jit`` and ``scan``."""

    def read(self, layer: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]: ...

    def stored(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]: ...

    def write(self, k: jax.Array, v: jax.Array) -> "KVContext": ...


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


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, head_dim] for positions [B, T]."""
    freqs = positions.astype(F32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rope on x [B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Hd]; k, v [B, S, G, Hd] (H a multiple
    of G); mask [B, T, S], True where query t may see key s. Returns [B, T, H, Hd]."""
    B, T, H, Hd = q.shape
    G = k.shape[2]
    qg = q.reshape(B, T, G, H // G, Hd)
    scores = jnp.einsum("btgrk,bsgk->bgrts", qg, k.astype(q.dtype), preferred_element_type=F32) * scale
    scores = jnp.where(mask[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(B, T, H, Hd)


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int | None, local: jax.Array) -> jax.Array:
    """[B, T, S]: key at k_pos [B, S] is at or before the query at q_pos [B, T],
    and, in a sliding-window (local) layer, within ``window`` positions of it
    (the query itself counting as one)."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    ok = d >= 0
    if window:
        ok = ok & ((d < window) | ~local)
    return ok


class Layers(nnx.Module):
    """Per-layer weights, each stacked over a leading ``layers`` axis."""


class Transformer(nnx.Module):
    """Decoder-only transformer; every weight comes from ``weight_specs(cfg)``.

    Build with random weights (``rngs``) or from a loaded nested weight dict
    (``params``, as ``jaxinfer.checkpoint`` returns it). Quantized params (the
    projections beside ``NAME_scale`` arrays, :mod:`jaxinfer.model.quant`) are
    recognised by their shapes; ``matmul`` and ``int8_rows`` say how their
    int8 matmuls compute (:func:`jaxinfer.model.quant.choose_matmul`).
    """

    def __init__(self, cfg: ModelConfig, *, params: dict | None = None, rngs: nnx.Rngs | None = None,
                 dtype=jnp.float32, matmul: str = "weight-only", int8_rows: int = 1):
        if params is None and rngs is None:
            raise ValueError("Transformer needs params or rngs")
        self.cfg = cfg
        self.layers = Layers()
        flat = flatten(params) if params is not None else None
        self.quant = quant_format(cfg, flat) if flat is not None else None
        self.matmul, self.int8_rows = matmul, int8_rows
        specs = weight_specs(cfg, self.quant)
        # contracted axes and storage format of each projection as the forward sees it (a layer's slice)
        self.contract = {name.rpartition("/")[2]: tuple(a - name.startswith("layers/") for a in spec.contract)
                         for name, spec in specs.items() if spec.contract}
        self.formats = {name.rpartition("/")[2]: tensor_format(name, self.quant)
                        for name, spec in specs.items() if spec.contract}
        if flat is not None:
            missing, extra = sorted(set(specs) - set(flat)), sorted(set(flat) - set(specs))
            if missing or extra:
                raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
        for name, spec in specs.items():
            if flat is not None:
                value = flat[name]
                if tuple(value.shape) != spec.shape:
                    raise ValueError(f"weight {name}: shape {tuple(value.shape)}, expected {spec.shape}")
                if spec.dtype is not None and jnp.dtype(value.dtype) != jnp.dtype(spec.dtype):
                    raise ValueError(f"weight {name}: dtype {value.dtype}, expected {spec.dtype}")
            else:
                noise = jax.random.normal(rngs.params(), spec.shape, F32)
                base = (0.0 if cfg.norm_offset else 1.0) if spec.init == "norm" else 0.0
                value = (base + (0.1 if spec.init == "norm" else 0.02) * noise).astype(dtype)
            owner, _, leaf = name.rpartition("/")
            setattr(self.layers if owner == "layers" else self, leaf, nnx.Param(value, logical_axes=spec.axes))

    def mm(self, eq: str, x: jax.Array, p: dict, name: str, out=None) -> jax.Array:
        """``einsum(eq, x, p[name])``, through :func:`~jaxinfer.model.quant.qdot` when quantized."""
        if self.quant is None:
            return jnp.einsum(eq, x, p[name], preferred_element_type=out)
        return qt.qdot(x, p[name], p[f"{name}_scale"], self.contract[name], self.formats[name], matmul=self.matmul,
                       rows=self.int8_rows, out=out, minimum=p.get(f"{name}_min"))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        if self.quant is None:
            x = jnp.take(self.embed[...], tokens, axis=0)
        else:
            x = qt.gather_rows(self.embed[...], self.embed_scale[...], tokens, self.formats["embed"],
                               self.final_norm[...].dtype, self.embed_min[...] if hasattr(self, "embed_min") else None)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), dtype=x.dtype)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits from final hidden states [..., D]."""
        name = "embed" if self.cfg.tie_embeddings else "lm_head"
        eq = "...d,vd->...v" if self.cfg.tie_embeddings else "...d,dv->...v"
        weights = {n: getattr(self, n)[...] for n in (name, f"{name}_scale", f"{name}_min") if hasattr(self, n)}
        return self.mm(eq, hidden, weights, name, out=F32)

    def block(self, x, p: dict, positions, rope, local, context: KVContext | None, layer):
        """One decoder layer on x [B, T, D]; returns the new x and this layer's
        new keys and values [B, T, G, Hd]."""
        cfg = self.cfg
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        h = rms_norm(x, p["attn_norm"], eps, off)
        q = self.mm("btd,dhk->bthk", h, p, "wq")
        k = self.mm("btd,dgk->btgk", h, p, "wk")
        v = self.mm("btd,dgk->btgk", h, p, "wv")
        if cfg.attention_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        if cfg.qk_norm:
            q, k = rms_norm(q, p["q_norm"], eps, off), rms_norm(k, p["k_norm"], eps, off)
        cos, sin = (jnp.where(local, a, b) for a, b in zip(rope["local"], rope["global"]))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)

        keys, values, key_pos, key_ok = k, v, positions, jnp.ones(positions.shape, bool)
        if context is not None:
            old_k, old_v, old_pos, old_ok = context.read(layer)
            new_q, new_k, new_v = context.stored(q, k, v)
            q = new_q.astype(q.dtype)
            keys = jnp.concatenate([old_k.astype(k.dtype), new_k.astype(k.dtype)], axis=1)
            values = jnp.concatenate([old_v.astype(v.dtype), new_v.astype(v.dtype)], axis=1)
            key_pos = jnp.concatenate([old_pos, positions], axis=1)
            key_ok = jnp.concatenate([old_ok, key_ok], axis=1)
        mask = visible(positions, key_pos, cfg.sliding_window, local) & key_ok[:, None, :]
        out = attention(q, keys, values, mask, cfg.attn_scale).astype(x.dtype)
        out = self.mm("bthk,hkd->btd", out, p, "wo")
        if cfg.post_norms:
            out = rms_norm(out, p["post_attn_norm"], eps, off)
        x = x + out

        h = rms_norm(x, p["mlp_norm"], eps, off)
        gate = self.mm("btd,df->btf", h, p, "w_gate")
        up = self.mm("btd,df->btf", h, p, "w_up")
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        out = self.mm("btf,fd->btd", act * up, p, "w_down")
        if cfg.post_norms:
            out = rms_norm(out, p["post_mlp_norm"], eps, off)
        return x + out, (k, v)

    def __call__(self, tokens: jax.Array, positions: jax.Array, context: KVContext | None = None):
        """tokens, positions [B, T] int32 -> (final-normed hidden [B, T, D], context).

        Without a context the tokens attend among themselves (causally, by
        position). With one they also attend to the earlier positions it reads,
        and their keys and values are written to it; the updated context is
        returned (None without one)."""
        cfg = self.cfg
        rope = {
            "global": rope_tables(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)),
            "local": rope_tables(positions, rope_inv_freq(cfg.head_dim, cfg.local_theta, None)),
        }
        weights = {name: w[...] for name, w in vars(self.layers).items() if isinstance(w, nnx.Param)}
        xs = (weights, jnp.array([kind == "local" for kind in cfg.layer_kinds]), jnp.arange(cfg.num_layers))

        def step(x, layer_xs):
            p, local, layer = layer_xs
            return self.block(x, p, positions, rope, local, context, layer)

        x, (ks, vs) = lax.scan(step, self.embed_tokens(tokens), xs)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_offset)
        return x, (context.write(ks, vs) if context is not None else None)


def quant_format(cfg: ModelConfig, flat: dict) -> str | None:
    """None, "int8" or "int4": the format of a flat weight dict, told by its shapes."""
    if "layers/wq_scale" not in flat:
        return None
    return "int4" if "layers/wq_min" in flat else "int8"


def params_tree(model: Transformer) -> dict:
    """The model's weights as a plain nested dict (checkpoint layout)."""
    flat = {}
    for name in weight_specs(model.cfg, model.quant):
        owner, _, leaf = name.rpartition("/")
        flat[name] = getattr(model.layers if owner == "layers" else model, leaf)[...]
    return nest(flat)
