"""What a converter returns, and how a source is recognised (shared by ``hf`` and ``gguf``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxinfer.config import ModelConfig
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


__all__ = ["ConvertedModel", "is_gguf", "is_hf_dir"]
