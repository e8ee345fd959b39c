"""Token-level perplexity and bits per byte of documents, with sliding windows.

Definition (the one the tests hold transformers to):

* A document's ids are ``x = tokenize(text)``: with BOS in front when the model adds one
  (Gemma), without when it does not (SmolLM2).
* Scored tokens are ``x[1:]``: every token after the first, each conditioned on the tokens
  before it. The first id is context only: BOS where the model adds one (so every text token is
  scored), else the first text token (which has nothing to be conditioned on).
* ``NLL = -sum_t log p(x_t | x_<t)`` over scored tokens, natural log;
  ``perplexity = exp(NLL / scored tokens)``;
  ``bits_per_byte = NLL / ln 2 / bytes``, where bytes are the UTF-8 bytes of the text the scored
  tokens cover (the whole text with BOS; the text minus the first token's text without).
* Windows (at most ``window`` ids, at most the engine's ``max_len``): window ``k`` ends at
  ``e_k = min(window + k * stride, n)`` and starts at ``max(e_k - window, 0)``; it scores the
  targets ``[e_{k-1}, e_k)`` (``e_{-1} = 1``) conditioned on the ids from its start. Every target
  is scored exactly once, with at least ``window - stride`` and at most ``window - 1`` tokens of
  context (``stride = 1``: always the full window). A window covering the whole document is the
  textbook definition. Windows after the first start inside the text, without BOS.
* Option: a prefix token (``--prefix eos``) in front of a document without BOS plays BOS's part,
  so that the first text token is scored too (lm-evaluation-harness's convention).
* Several documents: corpus perplexity is ``exp(sum NLL / sum scored tokens)``; each document is
  scored on its own (no context crosses documents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from jaxinfer.evaluation.backend import Backend


@dataclass(frozen=True)
class Window:
    begin: int  # first context id
    score_from: int  # first scored target (== end of the context)
    end: int  # one past the last scored target

    def pair(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        return list(ids[self.begin : self.score_from]), list(ids[self.score_from : self.end])


def rolling_windows(n: int, window: int, stride: int) -> list[Window]:
    """The windows over ``n`` ids (module docstring); none when there is nothing to score."""
    if window < 2:
        raise ValueError(f"window={window} must be >= 2 (one token of context, one to score)")
    if not 1 <= stride < window:
        raise ValueError(f"stride={stride} must be in [1, window={window}) so that every window has context")
    out: list[Window] = []
    prev, k = 1, 0
    while prev < n:
        end = min(window + k * stride, n)
        begin = max(end - window, 0)
        if end > prev:
            out.append(Window(begin, prev, end))
            prev = end
        k += 1
    return out


@dataclass
class DocumentResult:
    name: str
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes those tokens cover
    nll: float  # nats
    windows: int
    inexact_windows: int = 0  # server only: windows whose re-tokenization differed

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_json(self) -> dict:
        out = {
            "name": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
            "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "windows": self.windows,
        }
        if self.inexact_windows:
            out["inexact_windows"] = self.inexact_windows
        return out


def aggregate(docs: Sequence[DocumentResult], name: str = "total") -> DocumentResult:
    return DocumentResult(
        name, sum(d.tokens for d in docs), sum(d.bytes for d in docs), sum(d.nll for d in docs),
        sum(d.windows for d in docs), sum(d.inexact_windows for d in docs),
    )


def scored_bytes(text: str, ids: Sequence[int], first_is_bos: bool, decode: Callable[[list[int]], str] | None) -> int:
    total = len(text.encode("utf-8"))
    if first_is_bos or not ids:
        return total
    first = decode([ids[0]]) if decode is not None else ""
    return max(total - len(first.encode("utf-8")), 0)


def evaluate_perplexity(
    backend: Backend,
    documents: Sequence[tuple[str, str]],
    *,
    window: int | None = None,
    stride: int | None = None,
    progress: Callable[[int], None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    prefix_id: int | None = None,
) -> list[DocumentResult]:
    """Score ``(name, text)`` documents; ``window`` defaults to the backend's max_len and
    ``stride`` to half the window. ``decode`` (ids -> text) measures the first token's bytes for
    models without BOS (default: the backend's own detokenizer where it has one). ``prefix_id``
    (e.g. EOS, lm-evaluation-harness's convention for models without BOS) is put in front of
    documents that do not start with BOS, so that their first token is scored too."""
    window = min(window or backend.max_len, backend.max_len)
    stride = stride or max(window // 2, 1)
    rolling_windows(window + 1, window, stride)  # validate before tokenizing anything
    decode = decode or _decoder(backend)
    bos = backend.info.bos_id if backend.info.add_bos else None
    plan: list[tuple[int, Window]] = []
    ids_of: list[list[int]] = []
    results: list[DocumentResult] = []
    for d, (name, text) in enumerate(documents):
        ids = backend.tokenize(text)
        first_is_bos = bool(ids) and bos is not None and ids[0] == bos
        if prefix_id is not None and ids and not first_is_bos:
            ids, first_is_bos = [int(prefix_id)] + ids, True
        wins = rolling_windows(len(ids), window, stride)
        ids_of.append(ids)
        plan.extend((d, w) for w in wins)
        results.append(DocumentResult(name, 0, scored_bytes(text, ids, first_is_bos, decode), 0.0, len(wins)))
    pairs = [w.pair(ids_of[d]) for d, w in plan]
    scores = backend.score_tokens(pairs, progress)
    for (d, _), s in zip(plan, scores):
        results[d].nll -= math.fsum(s.output.token_logprobs)
        results[d].tokens += len(s.output.token_logprobs)  # len(ids) - 1 unless a server re-tokenized
        if not s.exact:
            results[d].inexact_windows += 1
    return results


def _decoder(backend: Backend) -> Callable[[list[int]], str] | None:
    tok = getattr(backend, "tokenizer", None)
    if tok is not None:
        return lambda ids: tok.decode(ids)
    detok = getattr(backend, "_detokenize", None)
    return detok


__all__ = ["Window", "rolling_windows", "DocumentResult", "aggregate", "evaluate_perplexity", "scored_bytes"]
