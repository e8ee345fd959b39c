"""Converters: Hugging Face safetensors and GGUF -> the canonical weight tree.

Each reader returns a :class:`ConvertedModel` (config, flat ``{name: np.ndarray}``
weights exactly as :func:`jaxinfer.model.weights.weight_specs` declares them, and
the tokenizer). ``jaxinfer.checkpoint`` saves it as an Orbax checkpoint.

- ``names``: the name tables and the builder that fills each target exactly once;
- ``hf``: a Hugging Face directory (``config.json`` + safetensors);
- ``gguf``: a GGUF file (every block type dequantized with the ``gguf`` package).
"""

from __future__ import annotations

from pathlib import Path

from jaxinfer.convert.gguf import read_gguf
from jaxinfer.convert.hf import read_hf
from jaxinfer.convert.source import ConvertedModel, is_gguf, is_hf_dir


def read_source(path: str | Path, *, dtype: str = "float32", progress: bool = True) -> ConvertedModel:
    """Read a GGUF file or a Hugging Face directory into the canonical tree (``dtype`` on host)."""
    path = Path(path).expanduser()
    if is_gguf(path):
        return read_gguf(path, dtype=dtype, progress=progress)
    if is_hf_dir(path):
        return read_hf(path, dtype=dtype, progress=progress)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise ValueError(f"{path} is neither a GGUF file nor a Hugging Face directory (config.json + *.safetensors)")


__all__ = ["ConvertedModel", "read_source", "is_gguf", "is_hf_dir"]
