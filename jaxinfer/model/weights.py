"""The one declaration of every weight: shape, logical axis names and initialiser.

Everything else derives from :func:`weight_specs`: the Flax NNX parameters of
:class:`jaxinfer.model.transformer.Transformer`, the abstract tree a checkpoint
is restored into, the shardings (``jaxinfer.sharding``), random init in tests,
and the set of names a converter must fill exactly once.

Names are ``/``-separated paths into a nested dict. Per-layer weights are stacked
over a leading ``layers`` axis so that the forward pass scans over layers.
Projection layouts (all "input dims first"):

    embed        [vocab, embed]
    layers/wq    [layers, embed, heads, head_dim]
    layers/wk    [layers, embed, kv_heads, head_dim]
    layers/wv    [layers, embed, kv_heads, head_dim]
    layers/wo    [layers, heads, head_dim, embed]
    layers/w_gate, layers/w_up [layers, embed, mlp];  layers/w_down [layers, mlp, embed]
    lm_head      [embed, vocab]          (absent when embeddings are tied)

Norm weights are stored exactly as the reference implementation holds them
(Gemma's without the +1; ``ModelConfig.norm_offset`` adds it at run time).

Quantized weights (``weight_specs(cfg, quant="int8" | "int4")``) are declared
here too, so sharding, checkpoint save/restore and the converters treat them
like every other weight. Each projection names its contracted (input) axes
(``contract``); the quantized array keeps the float weight's layout and a
``NAME_scale`` array of the same rank holds the scales: int8 has a float32 one
per output channel (the contracted axes have size 1); int4 a float16 one per group of
:data:`INT4_GROUP` inputs along the last contracted axis, with a ``NAME_min``
array beside it (asymmetric: value = q * scale + min, q in 0..15), and holds
its values two to a byte along that axis, which is halved in the stored shape.
Under ``int4`` the tensors in :data:`INT8_UNDER_INT4` stay int8
(:func:`tensor_format`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jaxinfer.config import ModelConfig

Init = Literal["normal", "zeros", "norm"]
QUANT_FORMATS = ("int8", "int4")
INT4_GROUP = 32  # inputs per int4 scale
# The embedding (read by every token, and the logits when tied), the output head, and the
# value and down projections stay int8 under int4, as llama.cpp's Q4_K_M mixes keep them at
# more bits: measured, these are where 4 bits cost the most perplexity (docs/quantization.md).
INT8_UNDER_INT4 = frozenset({"embed", "lm_head", "layers/wv", "layers/w_down"})


def tensor_format(name: str, quant: str | None) -> str | None:
    """The format weight ``name`` is stored in under model format ``quant``."""
    if quant == "int4" and name in INT8_UNDER_INT4:
        return "int8"
    return quant


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: Init = "normal"
    contract: tuple[int, ...] = ()  # axes a matmul contracts (projections only: the quantizable weights)
    dtype: str | None = None  # fixed storage dtype (quantized values, scales); None: the model's dtype

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")


def weight_specs(cfg: ModelConfig, quant: str | None = None) -> dict[str, WeightSpec]:
    """Every weight of ``cfg``'s model; with ``quant``, the projections stored in
    that format beside their scales."""
    specs = _float_specs(cfg)
    if quant is None:
        return specs
    if quant not in QUANT_FORMATS:
        raise ValueError(f"quant={quant!r}: expected one of {QUANT_FORMATS}")
    out: dict[str, WeightSpec] = {}
    for name, spec in specs.items():
        if not spec.contract:
            out[name] = spec
            continue
        out.update(quantized_spec(name, spec, quant))
    return out


def quantized_spec(name: str, spec: WeightSpec, quant: str) -> dict[str, WeightSpec]:
    """The stored arrays of projection ``name`` in model format ``quant``: values, scales
    (and int4's minimums)."""
    fmt = tensor_format(name, quant)
    last = spec.contract[-1]
    shape, scale_shape, scale_axes = list(spec.shape), list(spec.shape), list(spec.axes)
    if fmt == "int8":  # one scale per output channel
        for axis in spec.contract:
            scale_shape[axis], scale_axes[axis] = 1, None
        values = WeightSpec(tuple(shape), spec.axes, spec.init, spec.contract, "int8")
        return {name: values, f"{name}_scale": WeightSpec(tuple(scale_shape), tuple(scale_axes), "norm", (), "float32")}
    if spec.shape[last] % INT4_GROUP:
        raise ValueError(f"{name}: int4 needs axis {last} ({spec.shape[last]}) to be a multiple of {INT4_GROUP}")
    shape[last] //= 2
    scale_shape[last] = spec.shape[last] // INT4_GROUP
    group = WeightSpec(tuple(scale_shape), tuple(scale_axes), "norm", (), "float16")
    return {name: WeightSpec(tuple(shape), spec.axes, spec.init, spec.contract, "uint8"),
            f"{name}_scale": group, f"{name}_min": group}


def _float_specs(cfg: ModelConfig) -> dict[str, WeightSpec]:
    L, D, H, K, Hd, F, V = (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    s: dict[str, WeightSpec] = {
        "embed": WeightSpec((V, D), ("vocab", "embed"), contract=(1,)),
        "layers/attn_norm": WeightSpec((L, D), ("layers", "norm"), "norm"),
        "layers/wq": WeightSpec((L, D, H, Hd), ("layers", "embed", "heads", "head_dim"), contract=(1,)),
        "layers/wk": WeightSpec((L, D, K, Hd), ("layers", "embed", "kv_heads", "head_dim"), contract=(1,)),
        "layers/wv": WeightSpec((L, D, K, Hd), ("layers", "embed", "kv_heads", "head_dim"), contract=(1,)),
        "layers/wo": WeightSpec((L, H, Hd, D), ("layers", "heads", "head_dim", "embed"), contract=(1, 2)),
        "layers/mlp_norm": WeightSpec((L, D), ("layers", "norm"), "norm"),
        "layers/w_gate": WeightSpec((L, D, F), ("layers", "embed", "mlp"), contract=(1,)),
        "layers/w_up": WeightSpec((L, D, F), ("layers", "embed", "mlp"), contract=(1,)),
        "layers/w_down": WeightSpec((L, F, D), ("layers", "mlp", "embed"), contract=(1,)),
        "final_norm": WeightSpec((D,), ("norm",), "norm"),
    }
    if cfg.attention_bias:
        s["layers/bq"] = WeightSpec((L, H, Hd), ("layers", "heads", "head_dim"), "zeros")
        s["layers/bk"] = WeightSpec((L, K, Hd), ("layers", "kv_heads", "head_dim"), "zeros")
        s["layers/bv"] = WeightSpec((L, K, Hd), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        s["layers/q_norm"] = WeightSpec((L, Hd), ("layers", "norm"), "norm")
        s["layers/k_norm"] = WeightSpec((L, Hd), ("layers", "norm"), "norm")
    if cfg.post_norms:
        s["layers/post_attn_norm"] = WeightSpec((L, D), ("layers", "norm"), "norm")
        s["layers/post_mlp_norm"] = WeightSpec((L, D), ("layers", "norm"), "norm")
    if not cfg.tie_embeddings:
        s["lm_head"] = WeightSpec((D, V), ("embed", "vocab"), contract=(0,))
    return s


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=np.float32, scale: float = 0.02) -> dict[str, np.ndarray]:
    """Random weights as a flat ``{name: array}`` dict (numpy, host memory)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, spec in _float_specs(cfg).items():
        if spec.init == "normal":
            a = rng.standard_normal(spec.shape, dtype=np.float32) * scale
        elif spec.init == "zeros":
            a = rng.standard_normal(spec.shape, dtype=np.float32) * scale
        else:  # norms: around the identity scale, not exactly it, so tests see them
            base = 0.0 if cfg.norm_offset else 1.0
            a = base + rng.standard_normal(spec.shape, dtype=np.float32) * 0.1
        out[name] = a.astype(dtype)
    return out


def nest(flat: dict[str, object]) -> dict[str, object]:
    """``{"layers/wq": x}`` -> ``{"layers": {"wq": x}}``."""
    tree: dict[str, object] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value
    return tree


def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Inverse of :func:`nest`."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = v
    return out
