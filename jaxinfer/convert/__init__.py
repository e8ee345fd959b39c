"""Converters: Hugging Face safetensors and GGUF -> the canonical weight tree.

Each reader returns a :class:`ConvertedModel` (config, flat ``{name: np.ndarray}``
weights exactly as :func:`jaxinfer.model.weights.weight_specs` declares them, and
the tokenizer). ``jaxinfer.checkpoint`` saves it as an Orbax checkpoint.

- ``names``: the name tables and the builder that fills each target exactly once;
- ``hf``: a Hugging Face directory (``config.json`` + safetensors);
- ``gguf``: a GGUF file (every block type dequantized with the ``gguf`` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxinfer.config import ModelConfig

if TYPE_CHECKING:
    from jaxinfer.tokenizer import Tokenizer


@dataclass
class ConvertedModel:
    config: ModelConfig
    weights: dict[str, np.ndarray]  # canonical flat names -> arrays
    tokenizer: Tokenizer | None
    source: Path


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_source(path: str | Path, *, dtype: str = "float32", progress: bool = True) -> ConvertedModel:
    """Read a GGUF file or a Hugging Face directory into the canonical tree (``dtype`` on host)."""
    path = Path(path).expanduser()
    if is_gguf(path):
        from jaxinfer.convert.gguf import read_gguf

        return read_gguf(path, dtype=dtype, progress=progress)
    if is_hf_dir(path):
        from jaxinfer.convert.hf import read_hf

        return read_hf(path, dtype=dtype, progress=progress)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise ValueError(f"{path} is neither a GGUF file nor a Hugging Face directory (config.json + *.safetensors)")


__all__ = ["ConvertedModel", "read_source", "is_gguf", "is_hf_dir"]
