"""Result documents (JSON), the short table printed after a run, and the progress bar."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from jaxinfer.evaluation.backend import ModelInfo
from jaxinfer.version import __version__


def result_document(task: str, info: ModelInfo, *, settings: dict[str, Any], results: Any, elapsed_s: float,
                    throughput: dict[str, float] | None = None) -> dict[str, Any]:
    """One JSON document per run: what ran, on what, and what came out."""
    return {
        "task": task,
        "model": info.model,
        "checkpoint": info.checkpoint,
        "step": info.step,
        "server": info.server,
        "config": info.config,
        "dtype": info.dtype,
        "mesh": info.mesh,
        "engine": {"slots": info.slots, "max_len": info.max_len},
        "settings": settings,
        "results": results,
        "elapsed_s": round(elapsed_s, 3),
        "throughput": throughput or {},
        "jaxinfer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(doc: dict[str, Any], path: str | Path | None) -> None:
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if path is None or str(path) == "-":
        print(text, end="")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (numbers to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in cells)])


@contextmanager
def progress_bar(total: int | None, unit: str, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar whose rate is the throughput (tokens/s); yields ``update(n)``."""
    bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True,
               smoothing=0.1)
    try:
        yield bar.update
    finally:
        bar.close()


__all__ = ["result_document", "write_json", "format_table", "progress_bar"]
