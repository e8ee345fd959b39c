"""transformers (PyTorch CPU, float32) as the reference implementation on the real models' GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


class HFModels:
    """transformers' own model loaded from the GGUF that a converted checkpoint came from (its
    ``jaxinfer.json`` names it); each file is loaded once and shared (``tests/conftest.py`` keeps
    one per session)."""

    def __init__(self) -> None:
        self._models: dict[Path, torch.nn.Module] = {}

    def __call__(self, ckpt_dir: Path) -> torch.nn.Module:
        source = Path(json.loads((Path(ckpt_dir) / "jaxinfer.json").read_text())["source"])
        if source not in self._models:
            m = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            self._models[source] = m.eval()
        return self._models[source]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model, end-of-sequence tokens included
    (generate()'s min_new_tokens would mask them instead)."""
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        new: list[int] = []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            new.append(tok)
            out = hf(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return new
