"""Hugging Face directory (``config.json`` + safetensors) -> canonical weights.

Reads ``model.safetensors``, or the shards listed in ``model.safetensors.index.json``,
memory-mapped (bfloat16 included, without torch). Supports model_type llama,
mistral, qwen2, qwen3, gemma3_text, and gemma3 (the text model of the multimodal
checkpoint; vision tensors are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import from_hf_config
from jaxinfer.convert.source import ConvertedModel
from jaxinfer.tokenizer import from_hf_dir
from jaxinfer.convert.names import HF_IGNORED, WeightBuilder, hf_table, host_dtype

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}

# Gemma 3 multimodal checkpoints: transformers 5 and 4.x prefixes of the text model.
_GEMMA3_PREFIXES = [
    (re.compile(r"^(model\.language_model\.|language_model\.model\.)"), "model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
]
_GEMMA3_SKIPPED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def safetensors_index(path: Path) -> dict[str, tuple[Path, np.dtype, tuple[int, ...], int, int]]:
    """``{name: (file, dtype, shape, start, end)}`` of one safetensors file (header only)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(
                f"tensor {name!r} in {path} has dtype {info['dtype']}, expected one of {sorted(_ST_DTYPES)}"
            )
        start, end = info["data_offsets"]
        out[name] = (path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return out


def _files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {d}")
        return [d / f for f in files]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no model.safetensors, model.safetensors.index.json or *.safetensors in {d} "
            "(PyTorch .bin checkpoints are not supported: re-save with safe_serialization=True)"
        )
    return files


def iter_tensors(d: Path) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """(count, iterator of (name, memory-mapped array)) over every tensor of the directory."""
    entries: list[tuple[str, tuple]] = []
    for f in _files(d):
        entries += list(safetensors_index(f).items())

    def gen() -> Iterator[tuple[str, np.ndarray]]:
        maps: dict[Path, np.memmap] = {}
        for name, (path, dtype, shape, start, end) in entries:
            if path not in maps:
                maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            yield name, maps[path][start:end].view(dtype).reshape(shape)

    return len(entries), gen()


def read_hf(path: str | Path, *, dtype: str = "float32", progress: bool = True, name: str = "") -> ConvertedModel:
    d = Path(path).expanduser()
    raw = json.loads((d / "config.json").read_text())
    cfg = from_hf_config(raw, name=name or d.name)
    gen = d / "generation_config.json"
    if gen.is_file():  # instruct models list their end-of-turn ids here
        extra = json.loads(gen.read_text()).get("eos_token_id")
        extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *map(int, extra)])))
    multimodal = raw.get("model_type") == "gemma3" and "text_config" in raw
    builder = WeightBuilder(cfg, hf_table(cfg), dtype=host_dtype(dtype), what=str(d))
    count, tensors = iter_tensors(d)
    embed_src: np.ndarray | None = None
    tied_head: np.ndarray | None = None
    for tname, array in tqdm(tensors, total=count, desc=f"converting {d.name}", unit="tensor", disable=not progress):
        if multimodal:
            if _GEMMA3_SKIPPED.match(tname):
                continue
            for rx, repl in _GEMMA3_PREFIXES:
                tname = rx.sub(repl, tname)
        if HF_IGNORED.fullmatch(tname):
            continue
        if tname == "lm_head.weight" and cfg.tie_embeddings:
            if tied_head is not None:
                raise ValueError(f"duplicate tensor 'lm_head.weight' in {d}")
            tied_head = array
            continue
        if tname == "model.embed_tokens.weight":
            embed_src = array
        builder.add(tname, array)
    if tied_head is not None and embed_src is not None and not np.array_equal(tied_head, embed_src):
        raise ValueError(
            f"tensor 'lm_head.weight' in {d} differs from 'model.embed_tokens.weight' but config.json has "
            "tie_word_embeddings=true: expected no lm_head.weight or one equal to the embeddings"
        )
    weights = builder.finish()
    return ConvertedModel(config=cfg, weights=weights, tokenizer=from_hf_dir(d), source=d)
