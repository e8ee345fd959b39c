"""Multiple-choice accuracy from log-likelihoods.

Each item is ``{"context": str, "choices": [str, ...], "label": int}`` (optionally ``"id"``).
Choice ``i`` scores ``log p(choices[i] | context)`` under the scoring convention of
``jaxinfer score``: context and choice are joined as given, so the separating space belongs at
the start of each choice (``" Paris"``), as lm-evaluation-harness's default target delimiter puts
it. The prediction is the choice with the highest log-likelihood (``acc``) and with the highest
log-likelihood per character of the choice (``acc_norm``, lm-evaluation-harness's
length normalisation). Ties go to the first choice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from jaxinfer.evaluation.backend import Backend


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int
    id: str = ""


@dataclass(frozen=True)
class ChoiceOutcome:
    item: ChoiceItem
    logprobs: tuple[float, ...]
    token_counts: tuple[int, ...]
    is_greedy: tuple[bool, ...]

    @property
    def pred(self) -> int:
        return _argmax(self.logprobs)

    @property
    def pred_norm(self) -> int:
        return _argmax([lp / max(len(c), 1) for lp, c in zip(self.logprobs, self.item.choices)])

    def to_json(self) -> dict:
        return {
            "id": self.item.id, "label": self.item.label, "pred": self.pred, "pred_norm": self.pred_norm,
            "logprobs": list(self.logprobs), "tokens": list(self.token_counts), "is_greedy": list(self.is_greedy),
        }


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def read_items(path: str | Path) -> list[ChoiceItem]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            choices = tuple(str(c) for c in obj["choices"])
            label = int(obj["label"])
            context = str(obj["context"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"context\": str, \"choices\": [str, ...], \"label\": int}} ({e})") from None
        if len(choices) < 2 or not 0 <= label < len(choices):
            raise ValueError(f"{path}:{n}: needs at least 2 choices and 0 <= label < {len(choices)} (label={label})")
        items.append(ChoiceItem(context, choices, label, str(obj.get("id", n))))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def evaluate_choice(backend: Backend, items: Sequence[ChoiceItem],
                    progress: Callable[[int], None] | None = None) -> list[ChoiceOutcome]:
    pairs = [(it.context, c) for it in items for c in it.choices]
    scores = backend.score_texts(pairs, progress)
    out, k = [], 0
    for it in items:
        s = scores[k : k + len(it.choices)]
        k += len(it.choices)
        out.append(ChoiceOutcome(it, tuple(x.logprob for x in s), tuple(len(x.token_logprobs) for x in s),
                                 tuple(x.is_greedy for x in s)))
    return out


def summarize(outcomes: Sequence[ChoiceOutcome]) -> dict:
    n = len(outcomes)
    acc = sum(o.pred == o.item.label for o in outcomes) / n
    acc_norm = sum(o.pred_norm == o.item.label for o in outcomes) / n

    def stderr(p: float) -> float:  # of the mean of n Bernoulli outcomes (sample estimate)
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    return {
        "items": n, "acc": acc, "acc_stderr": stderr(acc), "acc_norm": acc_norm, "acc_norm_stderr": stderr(acc_norm),
        "scored_tokens": sum(sum(o.token_counts) for o in outcomes),
    }


__all__ = ["ChoiceItem", "ChoiceOutcome", "read_items", "evaluate_choice", "summarize"]
