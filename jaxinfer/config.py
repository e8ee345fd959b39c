"""Model configuration: one frozen dataclass for every supported decoder.

The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) and Gemma 3 are one
decoder whose differences are fields here, never copies of the model code.
Build a config from a Hugging Face ``config.json`` (:func:`from_hf_config`),
from GGUF metadata (``jaxinfer.convert.gguf``), or from a preset; variants come
from :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Activation = Literal["silu", "gelu_tanh"]
LayerType = Literal["global", "local"]


@dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling. ``kind`` is ``"llama3"`` or ``"linear"``."""

    kind: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: Literal["llama", "gemma3"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Rope base of sliding-window (local) layers; Gemma 3 uses 10k locally, 1M globally.
    rope_local_theta: float | None = None
    rope_scaling: RopeScaling | None = None  # applies to global layers only
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    post_norms: bool = False  # Gemma 3: norms after attention and after the MLP
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight)
    activation: Activation = "silu"
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(hidden_size)
    # Attention logits are scaled by query_pre_attn_scalar ** -0.5 (default head_dim).
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None  # width of local layers, counting the query itself
    layer_types: tuple[LayerType, ...] = ()  # empty: every layer global
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos: bool = True

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if any(t == "local" for t in self.layer_types) and not self.sliding_window:
            raise ValueError("local layers need sliding_window")

    @property
    def layer_kinds(self) -> tuple[LayerType, ...]:
        return self.layer_types or ("global",) * self.num_layers

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    @property
    def local_theta(self) -> float:
        return self.rope_local_theta or self.rope_theta

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for key in ("layer_types", "eos_token_ids"):
            d[key] = tuple(d.get(key) or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_json(Path(path).read_text())


LLAMA_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
GEMMA3_MODEL_TYPES = {"gemma3_text", "gemma3"}


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
    """Gemma 3: five sliding-window layers, then one global layer, repeating."""
    return tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(num_layers))


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 puts everything in rope_parameters; 4.x had rope_theta + rope_scaling.
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        params = params["full_attention"]
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3, linear)")


def _eos_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),)


def from_hf_config(d: dict, name: str = "") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` dictionary."""
    if "text_config" in d and d.get("model_type") == "gemma3":
        d = {**d["text_config"], "model_type": "gemma3_text"}
    model_type = d.get("model_type", "")
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = int(d.get("head_dim") or hidden // heads)
    theta, scaling = _rope_from_hf(d)
    common = dict(
        name=name or d.get("_name_or_path", "") or model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(d["intermediate_size"]),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_tuple(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )
    if model_type in LLAMA_MODEL_TYPES:
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {model_type} (supported: silu)")
        window = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
        layer_types: tuple[LayerType, ...] = ()
        if window:
            layer_types = ("local",) * common["num_layers"]
        hf_types = d.get("layer_types")
        if hf_types and window:
            layer_types = tuple("local" if t == "sliding_attention" else "global" for t in hf_types)
        return ModelConfig(
            family="llama",
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
            layer_types=layer_types,
            **common,
        )
    if model_type in GEMMA3_MODEL_TYPES:
        params = d.get("rope_parameters") or {}
        local_theta = float(
            (params.get("sliding_attention") or {}).get("rope_theta", d.get("rope_local_base_freq", 10000.0))
        )
        hf_types = d.get("layer_types")
        if hf_types:
            layer_types = tuple("local" if t == "sliding_attention" else "global" for t in hf_types)
        else:
            layer_types = gemma3_layer_types(common["num_layers"], int(d.get("sliding_window_pattern", 6)))
        if d.get("final_logit_softcapping") or d.get("attn_logit_softcapping"):
            raise ValueError("logit soft-capping is not supported (Gemma 3 does not use it)")
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported activation {act!r} for gemma3 (supported: gelu_pytorch_tanh)")
        return ModelConfig(
            family="gemma3",
            rope_local_theta=local_theta,
            qk_norm=True,
            post_norms=True,
            norm_offset=1.0,
            activation="gelu_tanh",
            embed_scale=True,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", head_dim)),
            sliding_window=int(d["sliding_window"]),
            layer_types=layer_types,
            attention_bias=bool(d.get("attention_bias", False)),
            **common,
        )
    raise ValueError(
        f"unknown architecture model_type={model_type!r} "
        f"(supported: {sorted(LLAMA_MODEL_TYPES | GEMMA3_MODEL_TYPES)})"
    )


# Presets: shapes of real models, used for tests with random weights and benchmarks.
SMOLLM2_135M = ModelConfig(
    name="smollm2-135m",
    family="llama",
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
    add_bos=False,
)

GEMMA3_270M = ModelConfig(
    name="gemma3-270m",
    family="gemma3",
    vocab_size=262144,
    hidden_size=640,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    intermediate_size=2048,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    tie_embeddings=True,
    qk_norm=True,
    post_norms=True,
    norm_offset=1.0,
    activation="gelu_tanh",
    embed_scale=True,
    query_pre_attn_scalar=256.0,
    sliding_window=512,
    layer_types=gemma3_layer_types(18),
    bos_token_id=2,
    eos_token_ids=(1, 106),
    pad_token_id=0,
    add_bos=True,
)

LLAMA3_8B = ModelConfig(
    name="llama3-8b-shape",
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SMOLLM2_135M, GEMMA3_270M, LLAMA3_8B)}


__all__ = [
    "ModelConfig",
    "RopeScaling",
    "from_hf_config",
    "gemma3_layer_types",
    "PRESETS",
    "SMOLLM2_135M",
    "GEMMA3_270M",
    "LLAMA3_8B",
]
