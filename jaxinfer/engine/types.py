"""Typed contract between the engine and whoever drives it (scheduler, CLI, eval).

The scheduler only sees :class:`EngineProtocol`; tests drive it with a
hand-computable fake engine that implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

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
    """log p(continuation | context), per token and summed; ``top_ids`` / ``top_logprobs``: the
    most likely token and its log-probability at each continuation position (empty when the
    engine does not report them)."""

    logprob: float
    token_logprobs: tuple[float, ...]
    is_greedy: bool
    context_ids: tuple[int, ...] = ()
    continuation_ids: tuple[int, ...] = ()
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


class StepHandle(Protocol):
    def result(self) -> dict[int, SlotToken]:
        """Block until the step is done; sampled tokens by slot."""


@dataclass
class EngineStats:
    num_slots: int
    max_len: int
    cache_bytes: int
    bytes_per_token: int
    prefill_buckets: tuple[int, ...] = ()
    compiled: dict[str, float] = field(default_factory=dict)  # name -> seconds


class EngineProtocol(Protocol):
    """What the scheduler needs from an engine.

    A slot is a row of the KV cache. ``prefill`` writes a prompt (or a chunk of
    one, at ``start``) into a slot; when ``last`` it samples and returns the
    first generated token, which also becomes the slot's next decode input.
    ``decode`` dispatches one step for the given active slots and returns at once;
    the handle's ``result()`` blocks. Calling ``decode`` again before reading the
    previous result is allowed (the device feeds sampled tokens back itself).

    Optional: an engine with ``prefill_many(items)`` (items: (slot, whole prompt,
    params)), ``prefill_many_limit`` (longest prompt it takes) and ``prefill_rows``
    (most prompts per call) gets runs of short prompts admitted together in one
    call; the scheduler falls back to ``prefill`` without them. An engine with
    ``decode_steps`` = k > 1 also takes ``decode(active, k)``, whose handle's
    ``results()`` gives one dict per step; the scheduler then dispatches k steps
    per call while every slot has room for them.
    """

    num_slots: int
    max_len: int
    prefill_chunk: int  # longest piece prefill accepts in one call

    def prefill(
        self, slot: int, tokens: Sequence[int], params: SamplingParams, *, start: int = 0, last: bool = True
    ) -> SlotToken | None: ...

    def decode(self, active: Sequence[int]) -> StepHandle: ...

    def release(self, slot: int) -> None: ...

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> ScoreOutput: ...
