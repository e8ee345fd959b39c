"""What goes in and out of the scheduler: requests, limits, events, errors, streams, stop strings.

Host only, no jax. :mod:`jaxinfer.scheduler.loop` is the loop that consumes these.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from jaxinfer.engine.types import SamplingParams, SlotToken

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")


class TokenizerLike(Protocol):
    eos_ids: Sequence[int]
    vocab_size: int

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class DetokenizerLike(Protocol):
    def add(self, ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


# -- errors -------------------------------------------------------------------------------------------


class InvalidRequestError(ValueError):
    """The request can never be served as given; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class QueueFullError(RuntimeError):
    """The waiting queue is at its request or token limit; retry later."""


class NotAcceptingError(RuntimeError):
    """The scheduler is draining or stopped."""


# -- requests and events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""  # "" -> a random id
    min_tokens: int = 0  # stop conditions are ignored until this many tokens were generated
    stop: tuple[str, ...] = ()  # stop strings; the text returned ends before the first match
    stop_token_ids: tuple[int, ...] = ()  # like eos, even when ignore_eos
    ignore_eos: bool = False
    return_logprobs: bool = False  # each token's logprob (+ sampling.logprobs top alternatives)
    deadline: float | None = None  # time.monotonic() seconds


@dataclass(frozen=True)
class SchedulerLimits:
    max_queue_requests: int = 256
    max_queue_tokens: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_stop_token_ids: int = 64
    max_request_id_length: int = 256
    model_max_len: int | None = None  # the model's own context limit, when tighter than engine.max_len
    prefill_budget: int | None = None  # prompt tokens per loop iteration; None: engine.prefill_chunk
    prefix_cache: bool = True  # reuse cached full pages of earlier prompts (--no-prefix-cache: off)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)


@dataclass(frozen=True)
class Timings:
    queue_s: float  # submit -> first admission (until finish when never admitted)
    ttft_s: float | None  # submit -> first generated token
    total_s: float  # submit -> finish


@dataclass(frozen=True)
class Event:
    """Tokens generated since the previous event; the last event has ``finish_reason``."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[SlotToken, ...] = ()  # one per token id when return_logprobs
    finish_reason: str | None = None  # stop | length | cancelled | deadline | error
    message: str = ""  # why, for cancelled / deadline / error
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True)
class Load:
    queue_requests: int
    queue_tokens: int
    active_seqs: int  # sequences holding a decode row
    live_requests: int  # submitted, not finished
    accepting: bool


class _Owner(Protocol):
    @property
    def running(self) -> bool: ...

    def _wake(self) -> None: ...


class RequestStream:
    """Events of one request. Iterate it (blocking); ``cancel()`` from any thread."""

    def __init__(self, request_id: str, scheduler: _Owner) -> None:
        self.request_id = request_id
        self._scheduler = scheduler
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                event = self._events.get(timeout=1.0)
            except queue.Empty:
                if not self._scheduler.running:
                    yield Event(self.request_id, finish_reason="error", message="scheduler stopped")
                    return
                continue
            yield event
            if event.finish_reason is not None:
                return


# -- stop strings -------------------------------------------------------------------------------------


class StopStringMatcher:
    """Holds back text while it could still be the beginning of a stop string.

    Invariant: no stop string occurs in the text seen so far, and no stop string can start inside
    the text already released, so a match can only start inside ``pending``.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Add text; returns (text safe to release, whether a stop string completed). After a
        match the text from the match on is dropped."""
        buf = self.pending + text
        self.pending = ""
        if not self.stops or not check:
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            return buf[: min(hits)], True
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                self.pending = tail
                return buf[:-k], False
        return buf, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
