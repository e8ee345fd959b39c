"""GGUF file -> canonical weights, config and tokenizer.

Every tensor is dequantized with ``gguf.quants.dequantize`` (all block types the
``gguf`` package implements), then llama.cpp's conventions are undone so that the
result equals what transformers loads from the same file:

- llama: q/k rows were permuted to interleaved rope pairs -> back to HF's halves;
- gemma3: norms were stored with the +1 folded in -> subtract 1.

A GGUF file records neither Gemma 3's local/global layer pattern nor its local rope
base; both come from the architecture (five local layers then one global, 10k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig, RopeScaling, gemma3_layer_types
from jaxinfer.convert.source import ConvertedModel
from jaxinfer.tokenizer import from_gguf
from jaxinfer.convert.names import WeightBuilder, gguf_table, host_dtype

ARCHITECTURES = ("llama", "gemma3")
_REQUIRED = object()


class _Meta:
    """Typed access to GGUF metadata; errors name the key and the file."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"GGUF metadata key {key!r} is missing in {self.path}")
            return default
        return field.contents()

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        v = self.get(key, default)
        if v is None or v is default:
            return v
        if isinstance(v, list):
            raise ValueError(f"GGUF metadata key {key!r} in {self.path} is a per-layer list; expected one integer")
        return int(v)


def _rope_scaling(meta: _Meta, arch: str) -> RopeScaling | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(meta.get(f"{arch}.rope.scaling.factor")))
    raise ValueError(f"GGUF metadata {arch}.rope.scaling.type={kind!r} in {meta.path} is not supported (none, linear)")


def _token_id(reader: gguf.GGUFReader, token: str) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return None
    want = token.encode()
    for i, idx in enumerate(field.data):
        if field.parts[idx].tobytes() == want:
            return i
    return None


def config_from_gguf(reader: gguf.GGUFReader, path: Path, name: str = "") -> ModelConfig:
    """A ModelConfig from GGUF metadata (``general.architecture`` llama or gemma3)."""
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture general.architecture={arch!r} in {path} (supported: {', '.join(ARCHITECTURES)})"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"tensor 'rope_freqs.weight' in {path}: per-frequency rope factors (llama3 rope scaling) are not "
            "supported from GGUF; convert the Hugging Face checkpoint instead"
        )
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"missing tensor 'token_embd.weight' in {path}")
    hidden = meta.int(f"{arch}.embedding_length")
    heads = meta.int(f"{arch}.attention.head_count")
    head_dim = meta.int(f"{arch}.attention.key_length", hidden // heads)
    value_dim = meta.int(f"{arch}.attention.value_length", head_dim)
    rope_dim = meta.int(f"{arch}.rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(
            f"GGUF metadata in {path}: key_length={head_dim}, value_length={value_dim}, "
            f"rope.dimension_count={rope_dim}; expected all equal (partial rope / distinct v dims unsupported)"
        )
    layers = meta.int(f"{arch}.block_count")
    bos = meta.int("tokenizer.ggml.bos_token_id", None)
    eos = [meta.int("tokenizer.ggml.eos_token_id", None), meta.int("tokenizer.ggml.eot_token_id", None)]
    if arch == "gemma3":
        eos.append(_token_id(reader, "<end_of_turn>"))
    spm = meta.get("tokenizer.ggml.model", "") == "llama"
    common = dict(
        name=name or path.stem,
        vocab_size=int(embed.shape[1]),  # ggml order: [embed, vocab]
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=meta.int(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        intermediate_size=meta.int(f"{arch}.feed_forward_length"),
        max_position_embeddings=meta.int(f"{arch}.context_length"),
        # stored as float32: keep its shortest decimal (1e-05, not 9.999999747378752e-06)
        rms_norm_eps=float(str(np.float32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon")))),
        rope_scaling=_rope_scaling(meta, arch),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        pad_token_id=meta.int("tokenizer.ggml.padding_token_id", None),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
    )
    if arch == "llama":
        return ModelConfig(
            family="llama",
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            **common,
        )
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: True = sliding window
        layer_types = tuple("local" if p else "global" for p in pattern)
    else:
        layer_types = gemma3_layer_types(layers, int(pattern))
    return ModelConfig(
        family="gemma3",
        rope_theta=float(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(meta.get("gemma3.rope.freq_base_swa", 10_000.0)),
        qk_norm=True,
        post_norms=True,
        norm_offset=1.0,
        activation="gelu_tanh",
        embed_scale=True,
        query_pre_attn_scalar=float(head_dim),
        sliding_window=meta.int("gemma3.attention.sliding_window"),
        layer_types=layer_types,
        **common,
    )


def dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """The tensor as float32 in numpy order (reversed ggml ``ne``), e.g. [out, in]."""
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        a = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise ValueError(
            f"tensor {tensor.name!r} in {path} has GGUF block type {kind.name}, which cannot be dequantized "
            "(expected a float or quantized block type the gguf package implements, e.g. F32, F16, Q8_0, Q4_K)"
        ) from None
    expected = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(a, dtype=np.float32).reshape(expected)


def read_gguf(path: str | Path, *, dtype: str = "float32", progress: bool = True, name: str = "") -> ConvertedModel:
    path = Path(path).expanduser()
    reader = gguf.GGUFReader(path)
    cfg = config_from_gguf(reader, path, name)
    builder = WeightBuilder(cfg, gguf_table(cfg), dtype=host_dtype(dtype), what=str(path))
    for tensor in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", disable=not progress):
        builder.match(tensor.name)  # name errors before the cost of dequantizing
        builder.add(tensor.name, dequantize(tensor, path))
    weights = builder.finish()
    tokenizer = None
    if "tokenizer.ggml.model" in reader.fields:
        tokenizer = from_gguf(reader)
    return ConvertedModel(config=cfg, weights=weights, tokenizer=tokenizer, source=path)
