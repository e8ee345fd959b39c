"""Typed contract between the engine and whoever drives it (scheduler, CLI, eval).

The scheduler only sees :class:`EngineProtocol`; tests drive it with a
hand-computable fake engine that implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; stacked per slot into arrays inside the engine."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # None: the engine picks one
    logprobs: int = 0  # number of top alternatives to return (0..MAX_TOP_LOGPROBS)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the field and its allowed range."""
        checks = [
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", 0 <= self.top_k and (vocab_size is None or self.top_k <= vocab_size),
             f"must be in [0, {vocab_size if vocab_size else 'vocab_size'}] (0 = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p < 1.0, "must be in [0, 1)"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("logprobs", 0 <= self.logprobs <= MAX_TOP_LOGPROBS, f"must be in [0, {MAX_TOP_LOGPROBS}]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2^63)"),
        ]
        for name, ok, limit in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {limit}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SlotToken:
    """One sampled token of one slot, with its log-probability (under the
    unmodified model distribution) and the top alternatives when asked."""

    token: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class ScoreOutput:
    """log p(continuation | context), per token and summed; per position also
    the greedy (argmax) token and its log-probability."""

    logprob: float
    token_logprobs: tuple[float, ...]
    is_greedy: bool
    context_ids: tuple[int, ...] = ()
    continuation_ids: tuple[int, ...] = ()
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class StepHandle(Protocol):
    def result(self) -> dict[int, SlotToken]:
        """Block until the step is done; sampled tokens by row."""

    def results(self) -> list[dict[int, SlotToken]]:
        """Every step of a multi-step call: one dict per step."""


@dataclass
class EngineStats:
    max_seqs: int
    max_len: int
    page_size: int
    num_pages: int
    pool_bytes: int
    bytes_per_token: int
    prefill_buckets: tuple[int, ...] = ()
    programs: int = 0  # programs compiled
    compiled: dict[str, float] = field(default_factory=dict)  # program -> seconds, and "total"


class EngineProtocol(Protocol):
    """What the scheduler needs from an engine (the Engine v2 contract).

    A *row* is one of ``max_seqs`` decode rows (it holds no KV); a *page* is
    ``page_size`` token positions of the KV pool, ids ``0 .. num_pages - 1``;
    a sequence's page table lists the pages of its positions 0, 1, ... in order.

    ``prefill`` writes ``tokens`` at positions start .. start+len-1 through
    ``pages`` (the whole table so far; positions < start are already there: a
    cached prefix or earlier pieces). When ``last`` it samples the first
    generated token, arms ``row`` for decode and returns the token.
    ``decode`` dispatches ``steps`` steps for ``rows`` (pages[row] covers the
    row's length + steps positions) and returns at once; it may be called
    again before the previous handle was read. ``release`` forgets a row's
    decode state. ``score`` runs tokens at positions start.. (writing their K/V
    into ``pages``) and returns log p(targets[i] | sequence up to tokens[i]).

    Optional, used when present: ``prefill_many(items)`` with items ``(row,
    tokens, params, start, pages)`` (at most ``prefill_rows`` of them, each at
    most ``prefill_many_limit`` tokens) in one call; ``decode_steps`` = k > 1
    means ``decode(rows, pages, k)`` is compiled (the handle's ``results()``
    gives one dict per step). ``recover()`` after a failed call: True when the
    device state and pool were lost with it and replaced by fresh ones (every
    row released, every page's contents gone).
    """

    max_seqs: int
    max_len: int
    page_size: int
    num_pages: int
    prefill_chunk: int  # longest piece prefill/score accepts in one call

    def prefill(self, row: int, tokens: Sequence[int], params: SamplingParams, *, pages: Sequence[int],
                start: int = 0, last: bool = True) -> SlotToken | None: ...

    def decode(self, rows: Sequence[int], pages: Mapping[int, Sequence[int]], steps: int = 1) -> StepHandle: ...

    def release(self, row: int) -> None: ...

    def score(self, tokens: Sequence[int], targets: Sequence[int], *, pages: Sequence[int],
              start: int = 0) -> ScoreOutput: ...
