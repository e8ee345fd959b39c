"""The loop's bookkeeping of one request and one in-flight decode call."""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxinfer.engine.types import StepHandle
from jaxinfer.scheduler.requests import DetokenizerLike, Request, RequestStream, StopStringMatcher

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass(eq=False)  # identity: the block manager's handle for the sequence's pages
class Seq:
    req: Request
    rid: str
    stream: RequestStream
    detok: DetokenizerLike
    matcher: StopStringMatcher
    submitted_at: float
    state: str = WAITING
    row: int = -1
    out: list[int] = field(default_factory=list)  # tokens generated (and emitted) so far
    fill: tuple[int, ...] = ()  # what this admission prefills: prompt + tokens generated before it
    prefilled: int = 0  # positions of `fill` in the cache (a cached prefix counts)
    dispatched: int = 0  # decode steps dispatched since this admission's prefill
    epoch: int = 0  # admissions so far: tells a stale in-flight result from a current one
    cached_tokens: int = 0  # prompt tokens the first admission found in the prefix cache
    preemptions: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def generated(self) -> int:
        return len(self.out)

    @property
    def to_prefill(self) -> int:
        return len(self.fill) - self.prefilled

    @property
    def length(self) -> int:
        """Positions the device will have written once every dispatched step ran."""
        return len(self.fill) + self.dispatched

    @property
    def may_decode(self) -> bool:
        """Another decode step can still give a token within max_tokens (the prefill gave one)."""
        before = len(self.fill) - self.prompt_len
        return before + 1 + self.dispatched < self.req.max_tokens

    @property
    def written(self) -> tuple[int, ...]:
        """Tokens at positions 0.. known to be in the cache: a decode step writes its input, so
        every generated token but the last one."""
        if self.state == PREFILLING:
            return self.fill[: self.prefilled]
        return (self.req.prompt_ids + tuple(self.out))[: self.prompt_len + len(self.out) - 1]


@dataclass
class Step:
    handle: StepHandle
    owners: dict[int, tuple[Seq, int]]  # row -> (sequence, its epoch) at dispatch
    steps: int = 1  # decode steps in this call (results() holds one dict per step)
