"""Generations for a JSONL file of prompts, written as JSONL for downstream metrics.

Input lines: ``{"prompt": str}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat
template), plus any other fields, which are copied to the output. A line may override the
command-line options with ``max_tokens``, ``stop`` (string or list), ``temperature``, ``top_p``,
``top_k``, ``min_p`` and ``seed``. Output lines: the input fields plus ``generation`` (text,
ending before the first stop string), ``finish_reason`` (``stop`` | ``length``),
``prompt_tokens`` and ``completion_tokens``. With ``--seed S`` line ``i`` samples with seed
``S + i`` unless it gives its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from jaxinfer.evaluation.backend import Generation, GenerationOptions, Prompt

OVERRIDABLE = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


def read_prompts(path: str | Path, defaults: GenerationOptions, *, chat: bool = False
                 ) -> tuple[list[dict], list[Prompt], list[GenerationOptions]]:
    rows, prompts, options = [], [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise TypeError("not an object")
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object ({e})") from None
        if "messages" in obj:
            msgs = tuple((str(m["role"]), str(m["content"])) for m in obj["messages"])
            prompt = Prompt(messages=msgs)
        elif "prompt" in obj:
            prompt = Prompt(messages=(("user", str(obj["prompt"])),)) if chat else Prompt(text=str(obj["prompt"]))
        else:
            raise ValueError(f"{path}:{n}: needs \"prompt\" or \"messages\"")
        over = {k: obj[k] for k in OVERRIDABLE if k in obj}
        if isinstance(over.get("stop"), str):
            over["stop"] = (over["stop"],)
        if "stop" in over:
            over["stop"] = tuple(over["stop"])
        opt = dataclasses.replace(defaults, **over)
        if "seed" not in obj and defaults.seed is not None:
            opt = dataclasses.replace(opt, seed=defaults.seed + len(rows))
        rows.append(obj)
        prompts.append(prompt)
        options.append(opt)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows, prompts, options


def output_rows(rows: Sequence[dict], generations: Sequence[Generation]) -> list[dict]:
    return [
        {**row, "generation": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
         "completion_tokens": len(g.token_ids)}
        for row, g in zip(rows, generations)
    ]


__all__ = ["read_prompts", "output_rows"]
