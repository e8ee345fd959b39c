"""Name tables: source tensor names -> canonical weight names, with layouts.

A :class:`Rule` maps one source tensor name template (``{i}`` is the layer index)
to a canonical name of :func:`jaxinfer.model.weights.weight_specs` and a layout
that turns the source array into the canonical one. Sources hold projections as
``[out_features, in_features]`` (PyTorch ``nn.Linear``; a dequantized GGUF tensor
has the same numpy shape); the canonical tree is "input dims first" with heads
split out. A rule may carry a source-level ``fix`` applied first (undoing a GGUF
convention).

:class:`WeightBuilder` applies a table: it checks every tensor's shape, stacks
per-layer tensors into ``[layers, ...]`` arrays, and raises :class:`ValueError`
naming the tensor for an unknown, duplicate, misshapen or missing tensor, so that
every canonical target is set exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.model.weights import weight_specs

DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def host_dtype(name: str) -> np.dtype:
    """numpy dtype of a checkpoint dtype name ("float32" or "bfloat16")."""
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


Layout = Literal["copy", "linear", "heads_in", "heads_out", "bias"]
Fix = Callable[[np.ndarray], np.ndarray]


def _source_shape(layout: Layout, target: tuple[int, ...]) -> tuple[int, ...]:
    """The source shape that ``layout`` turns into ``target`` (per layer)."""
    if layout == "copy":
        return target
    if layout == "linear":  # [out, in] -> [in, out]
        return target[::-1]
    if layout == "heads_in":  # [heads*head_dim, embed] -> [embed, heads, head_dim]
        return (target[1] * target[2], target[0])
    if layout == "heads_out":  # [embed, heads*head_dim] -> [heads, head_dim, embed]
        return (target[2], target[0] * target[1])
    if layout == "bias":  # [heads*head_dim] -> [heads, head_dim]
        return (target[0] * target[1],)
    raise AssertionError(layout)


def _apply_layout(layout: Layout, a: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    if layout == "copy":
        return a
    if layout in ("linear", "heads_in", "heads_out"):
        return a.T.reshape(target)
    return a.reshape(target)  # bias


@dataclass(frozen=True)
class Rule:
    source: str  # template; "{i}" stands for the layer index
    target: str  # canonical name (a key of weight_specs)
    layout: Layout = "copy"
    fix: Fix | None = None

    @property
    def layered(self) -> bool:
        return "{i}" in self.source

    def regex(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.source).replace(re.escape("{i}"), r"(?P<i>\d+)"))

    def name(self, layer: int | None) -> str:
        return self.source.format(i=layer) if self.layered else self.source


# --- fixes undoing GGUF conventions ------------------------------------------------------


def minus_one(a: np.ndarray) -> np.ndarray:
    """Gemma GGUF norms have the +1 folded in; the canonical tree holds HF's values."""
    return a - np.float32(1.0)


def rope_unpermute(n_heads: int) -> Fix:
    """Invert llama.cpp's q/k row permutation (``convert_hf_to_gguf.py`` ``permute``).

    llama.cpp stores ``w.reshape(n, 2, hd//2, D).swapaxes(1, 2)`` (interleaved rope
    pairs); this returns HF's half-split layout, as transformers' GGUF loader does.
    """

    def fix(a: np.ndarray) -> np.ndarray:
        rows, rest = a.shape[0], a.shape[1:]
        return a.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(a.shape)

    return fix


# --- tables ------------------------------------------------------------------------------

_HF_COMMON = [
    Rule("model.embed_tokens.weight", "embed"),
    Rule("model.norm.weight", "final_norm"),
    Rule("lm_head.weight", "lm_head", "linear"),
    Rule("model.layers.{i}.input_layernorm.weight", "layers/attn_norm"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/wq", "heads_in"),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "layers/wk", "heads_in"),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "layers/wv", "heads_in"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "layers/wo", "heads_out"),
    Rule("model.layers.{i}.self_attn.q_proj.bias", "layers/bq", "bias"),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "layers/bk", "bias"),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "layers/bv", "bias"),
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "layers/w_gate", "linear"),
    Rule("model.layers.{i}.mlp.up_proj.weight", "layers/w_up", "linear"),
    Rule("model.layers.{i}.mlp.down_proj.weight", "layers/w_down", "linear"),
]

# Llama's HF "post_attention_layernorm" is the norm *before* the MLP.
HF_LLAMA = [*_HF_COMMON, Rule("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm")]

# Gemma 3's is a real post-attention norm; its pre-MLP norm is "pre_feedforward_layernorm".
HF_GEMMA3 = [
    *_HF_COMMON,
    Rule("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attn_norm"),
    Rule("model.layers.{i}.pre_feedforward_layernorm.weight", "layers/mlp_norm"),
    Rule("model.layers.{i}.post_feedforward_layernorm.weight", "layers/post_mlp_norm"),
]

# HF tensors that carry no weights of ours.
HF_IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


def gguf_table(cfg: ModelConfig) -> list[Rule]:
    """GGUF names (llama.cpp's ``blk.{i}.*``) for ``general.architecture`` llama or gemma3."""
    if cfg.family == "llama":
        q_fix, k_fix = rope_unpermute(cfg.num_heads), rope_unpermute(cfg.num_kv_heads)
        norm_fix = None
    else:
        q_fix = k_fix = None
        norm_fix = minus_one
    rules = [
        Rule("token_embd.weight", "embed"),
        Rule("output_norm.weight", "final_norm", fix=norm_fix),
        Rule("output.weight", "lm_head", "linear"),
        Rule("blk.{i}.attn_norm.weight", "layers/attn_norm", fix=norm_fix),
        Rule("blk.{i}.attn_q.weight", "layers/wq", "heads_in", q_fix),
        Rule("blk.{i}.attn_k.weight", "layers/wk", "heads_in", k_fix),
        Rule("blk.{i}.attn_v.weight", "layers/wv", "heads_in"),
        Rule("blk.{i}.attn_output.weight", "layers/wo", "heads_out"),
        Rule("blk.{i}.attn_q_norm.weight", "layers/q_norm", fix=norm_fix),
        Rule("blk.{i}.attn_k_norm.weight", "layers/k_norm", fix=norm_fix),
        Rule("blk.{i}.ffn_norm.weight", "layers/mlp_norm", fix=norm_fix),  # pre-MLP in both families
        Rule("blk.{i}.ffn_gate.weight", "layers/w_gate", "linear"),
        Rule("blk.{i}.ffn_up.weight", "layers/w_up", "linear"),
        Rule("blk.{i}.ffn_down.weight", "layers/w_down", "linear"),
    ]
    if cfg.family == "gemma3":
        rules += [
            Rule("blk.{i}.post_attention_norm.weight", "layers/post_attn_norm", fix=norm_fix),
            Rule("blk.{i}.post_ffw_norm.weight", "layers/post_mlp_norm", fix=norm_fix),
        ]
    return rules


def hf_table(cfg: ModelConfig) -> list[Rule]:
    return HF_LLAMA if cfg.family == "llama" else HF_GEMMA3


# --- builder -----------------------------------------------------------------------------


class WeightBuilder:
    """Fills the canonical flat weight dict from source tensors, one at a time.

    ``add`` each source tensor, then ``finish``. ``what`` names the source in errors.
    """

    def __init__(self, cfg: ModelConfig, rules: list[Rule], *, dtype=np.float32, what: str = "checkpoint"):
        self.cfg = cfg
        self.specs = weight_specs(cfg)
        self.dtype = np.dtype(dtype)
        self.what = what
        self._rules = [(r, r.regex()) for r in rules]
        self._out: dict[str, np.ndarray] = {}
        self._seen: dict[tuple[str, int | None], str] = {}  # (target, layer) -> source name

    def match(self, name: str) -> tuple[Rule, int | None]:
        for rule, rx in self._rules:
            m = rx.fullmatch(name)
            if m:
                return rule, (int(m["i"]) if rule.layered else None)
        raise ValueError(f"unexpected tensor {name!r} in {self.what}: no rule maps it to a {self.cfg.family} weight")

    def add(self, name: str, array: np.ndarray) -> None:
        rule, layer = self.match(name)
        spec = self.specs.get(rule.target)
        if spec is None:
            raise ValueError(
                f"unexpected tensor {name!r} in {self.what}: it maps to {rule.target!r}, which this config does not "
                f"have (attention_bias={self.cfg.attention_bias}, qk_norm={self.cfg.qk_norm}, "
                f"post_norms={self.cfg.post_norms}, tie_embeddings={self.cfg.tie_embeddings})"
            )
        target_shape = spec.shape[1:] if rule.layered else spec.shape
        if layer is not None and not 0 <= layer < self.cfg.num_layers:
            raise ValueError(
                f"unexpected tensor {name!r} in {self.what}: layer {layer} but num_layers={self.cfg.num_layers}"
            )
        key = (rule.target, layer)
        if key in self._seen:
            raise ValueError(
                f"duplicate tensor {name!r} in {self.what}: {rule.target}"
                + (f"[{layer}]" if layer is not None else "")
                + f" was already set from {self._seen[key]!r}"
            )
        expected = _source_shape(rule.layout, target_shape)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"tensor {name!r} in {self.what} has shape {tuple(array.shape)}, expected {expected} "
                f"(for {rule.target} {spec.shape})"
            )
        a = rule.fix(np.asarray(array, dtype=np.float32)) if rule.fix else np.asarray(array)
        a = _apply_layout(rule.layout, a, target_shape)
        if layer is None:
            self._out[rule.target] = np.ascontiguousarray(a, dtype=self.dtype)
        else:
            if rule.target not in self._out:
                self._out[rule.target] = np.empty(spec.shape, self.dtype)
            self._out[rule.target][layer] = a
        self._seen[key] = name

    def finish(self) -> dict[str, np.ndarray]:
        """The canonical weights; ValueError naming the missing source tensors if any."""
        sources = {r.target: r for r, _ in reversed(self._rules)}  # first rule wins for naming
        missing: list[str] = []
        for target, spec in self.specs.items():
            layers: list[int | None] = list(range(spec.shape[0])) if spec.axes[0] == "layers" else [None]
            for layer in layers:
                if (target, layer) not in self._seen:
                    rule = sources.get(target)
                    src = rule.name(layer) if rule else "<no source rule>"
                    missing.append(f"{src} (-> {target}" + (f"[{layer}])" if layer is not None else ")"))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"missing tensor in {self.what}: {', '.join(missing[:5])}{more}")
        return {name: self._out[name] for name in self.specs}
