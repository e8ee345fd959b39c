"""Continuous batching: the host loop between the request front end and the engine.

Host only (this module never imports jax). It talks to the device through
:class:`~jaxinfer.engine.types.EngineProtocol` and knows nothing about gRPC.

Pipeline::

    submit(Request)                                          (caller's thread)
      -> validate: non-empty prompt, ids < vocab, prompt + max_tokens <= max_len (engine and model),
         min_tokens <= max_tokens, SamplingParams.validate, stop strings / stop ids bounded
         (InvalidRequestError naming the field and the limit; nothing is truncated here)
      -> bounded waiting queue, by requests AND by prompt tokens (QueueFullError at once, with the limit)
      -> RequestStream: the caller iterates its Events; cancel() from any thread

    loop (one thread owns the engine; one iteration):
      1. reap      cancelled / past-deadline requests, queued or in a slot -> finished, slot released
      2. score     score() jobs run here, so they never overlap a prefill or decode call
      3. admit     waiting requests into free slots, first come first served
      4. prefill   at most `prefill_budget` prompt tokens per iteration, in pieces of at most
                   engine.prefill_chunk, so a long prompt's chunks interleave with decode steps and
                   running streams keep flowing; the last chunk samples the request's first token.
                   A run of short whole prompts goes in one call (engine.prefill_many, up to
                   engine.prefill_rows of them) where the engine offers it
      5. dispatch  engine.decode(slots that may still produce a token) -- returns at once; k steps
                   in one call where the engine has decode_steps = k > 1 and every slot has room
      6. read      the PREVIOUS step's handle.result() while the device runs step 5, then update:
                   eos / stop_token_ids / stop strings (held off until min_tokens) / max_tokens
                   -> incremental detokenize; text is held back while it could still be the
                   beginning of a stop string -> Event on the request's stream; finished -> release slot

Reading step k-1 after dispatching step k means a request that finishes in step k-1 also ran in
step k. Each in-flight step therefore remembers which sequence owned each slot when it was
dispatched, and a result is applied only if that sequence still owns the slot and is still
decoding; a slot freed (and maybe re-prefilled) since then just drops the stale token. A request
is never dispatched past its own token limit, so the cache is never written beyond max_len.

Failures stay local: an exception while prefilling or updating one request ends that request with
finish_reason "error" and a message; a failing decode step ends the requests in that step. The
loop itself never dies silently: on an unexpected error it fails what it holds and goes on.
Cancellation and deadlines free the slot within one iteration (one decode call: one step, or
k with decode_steps = k). drain() stops
admitting, lets queued and running requests finish within a grace period, then cancels the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from jaxinfer.engine.types import EngineProtocol, SamplingParams, ScoreOutput, SlotToken, StepHandle
from jaxinfer.metrics import Metrics
from jaxinfer.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_s: float  # submit -> slot (until finish when never admitted)
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
    active_slots: int
    live_requests: int  # submitted, not finished
    accepting: bool


class RequestStream:
    """Events of one request. Iterate it (blocking); ``cancel()`` from any thread."""

    def __init__(self, request_id: str, scheduler: Scheduler) -> None:
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


# -- internal state -----------------------------------------------------------------------------------

_WAITING, _PREFILLING, _DECODING, _FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass(eq=False)
class _Seq:
    req: Request
    rid: str
    stream: RequestStream
    detok: DetokenizerLike
    matcher: StopStringMatcher
    submitted_at: float
    state: str = _WAITING
    slot: int = -1
    prefilled: int = 0  # prompt tokens written to the cache
    generated: int = 0  # tokens received
    dispatched: int = 0  # decode steps dispatched
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)


@dataclass
class _Step:
    handle: StepHandle
    owners: dict[int, _Seq]  # slot -> sequence that owned it at dispatch
    steps: int = 1  # decode steps in this call (results() holds one dict per step)


@dataclass
class _ScoreJob:
    context: tuple[int, ...]
    continuation: tuple[int, ...]
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclass
class _ScoreBatchJob:
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        return sum(len(c) + len(x) for c, x in self.pairs)


def _real_detokenizer(tokenizer: TokenizerLike) -> DetokenizerLike:
    return IncrementalDetokenizer(tokenizer)


# -- the scheduler ------------------------------------------------------------------------------------


class Scheduler:
    """Continuous batching over one engine. ``start()`` runs the loop in a daemon thread."""

    def __init__(
        self,
        engine: EngineProtocol,
        tokenizer: TokenizerLike,
        limits: SchedulerLimits = SchedulerLimits(),
        *,
        metrics: Metrics | None = None,
        detokenizer: Callable[[TokenizerLike], DetokenizerLike] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics or Metrics()
        if detokenizer is None:
            _real_detokenizer(tokenizer)  # fail at construction, not on the first request
            detokenizer = _real_detokenizer
        self._make_detok = detokenizer
        self._eos = frozenset(int(t) for t in tokenizer.eos_ids)
        self.vocab_size = int(tokenizer.vocab_size)
        self.max_len = int(engine.max_len)
        if limits.model_max_len:
            self.max_len = min(self.max_len, int(limits.model_max_len))
        self.num_slots = int(engine.num_slots)
        self._chunk = max(1, int(engine.prefill_chunk))
        self._budget = max(1, int(limits.prefill_budget or self._chunk))
        # several whole short prompts per prefill call, where the engine can
        self._many_limit = int(getattr(engine, "prefill_many_limit", 0)) if hasattr(engine, "prefill_many") else 0
        self._many_rows = int(getattr(engine, "prefill_rows", 1))
        # k decode steps per dispatch where the engine offers it (see _dispatch)
        self._k = max(1, int(getattr(engine, "decode_steps", 1) or 1))
        self._cache_len = int(engine.max_len)

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        # guarded by _lock
        self._waiting: deque[_Seq] = deque()
        self._waiting_tokens = 0
        self._scores: deque[_ScoreJob | _ScoreBatchJob] = deque()
        self._accepting = True
        self._stopping = False
        self._live = 0
        self._abort_all: str | None = None
        # owned by the loop thread
        self._slots: list[_Seq | None] = [None] * self.num_slots
        self._running: list[_Seq] = []  # admitted, in admission order
        self._inflight: deque[_Step] = deque()
        self._thread: threading.Thread | None = None

    # -- public API (any thread) -----------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxinfer-scheduler", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def validate(self, req: Request) -> None:
        """Raise InvalidRequestError naming the field and its limit."""
        lim, n = self.limits, len(req.prompt_ids)
        if len(req.request_id) > lim.max_request_id_length:
            raise InvalidRequestError(
                "request_id", f"request_id has {len(req.request_id)} characters (limit {lim.max_request_id_length})"
            )
        if n == 0:
            raise InvalidRequestError("prompt", "prompt is empty: it must have at least one token")
        self.check_token_ids("prompt_token_ids", req.prompt_ids)
        if req.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"max_tokens={req.max_tokens} must be >= 1")
        if not 0 <= req.min_tokens <= req.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"min_tokens={req.min_tokens} must be in [0, max_tokens={req.max_tokens}]"
            )
        if n + req.max_tokens > self.max_len:
            raise InvalidRequestError(
                "max_tokens",
                f"prompt of {n} tokens + max_tokens={req.max_tokens} = {n + req.max_tokens} exceeds the "
                f"context limit max_len={self.max_len} (engine max_len={self.engine.max_len}, "
                f"model limit={lim.model_max_len or 'none'}); shorten the prompt, lower max_tokens, "
                f"or ask for truncate_prompt",
            )
        try:
            req.sampling.validate(self.vocab_size)
        except ValueError as e:
            raise InvalidRequestError(str(e).split("=", 1)[0], str(e)) from None
        if req.sampling.logprobs and not req.return_logprobs:
            raise InvalidRequestError(
                "logprobs", f"{req.sampling.logprobs} top alternatives asked but return_logprobs is off"
            )
        if len(req.stop) > lim.max_stop_strings:
            raise InvalidRequestError("stop", f"{len(req.stop)} stop strings (limit {lim.max_stop_strings})")
        for i, s in enumerate(req.stop):
            if not 0 < len(s) <= lim.max_stop_length:
                raise InvalidRequestError(
                    "stop", f"stop[{i}] has {len(s)} characters (must be 1..{lim.max_stop_length})"
                )
        if len(req.stop_token_ids) > lim.max_stop_token_ids:
            raise InvalidRequestError(
                "stop_token_ids", f"{len(req.stop_token_ids)} stop token ids (limit {lim.max_stop_token_ids})"
            )
        self.check_token_ids("stop_token_ids", req.stop_token_ids)

    def check_token_ids(self, name: str, ids: Sequence[int]) -> None:
        """InvalidRequestError naming the first id outside [0, vocab_size)."""
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise InvalidRequestError(name, f"{name}[{i}]={t} is out of range [0, vocab_size={self.vocab_size})")

    def submit(self, req: Request) -> RequestStream:
        """Queue a request; raises InvalidRequestError, QueueFullError or NotAcceptingError at once."""
        try:
            self.validate(req)
        except InvalidRequestError:
            self.metrics.request_rejected("invalid")
            raise
        rid = req.request_id or uuid.uuid4().hex
        stream = RequestStream(rid, self)
        seq = _Seq(req, rid, stream, self._make_detok(self.tokenizer), StopStringMatcher(req.stop), time.monotonic())
        with self._cv:
            self._admission_check(len(req.prompt_ids))
            self._waiting.append(seq)
            self._waiting_tokens += seq.prompt_len
            self._live += 1
            self.metrics.request_started()
            self._cv.notify_all()
        log.debug("request_id=%s queued prompt_tokens=%d max_tokens=%d", rid, seq.prompt_len, req.max_tokens)
        return stream

    def score(self, context: Sequence[int], continuation: Sequence[int], timeout: float | None = None) -> ScoreOutput:
        """log p(continuation | context), computed on the loop thread between steps."""
        context, continuation = self._check_score_pair(context, continuation)
        return self._queue_score(_ScoreJob(context, continuation), timeout)

    def score_batch(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], timeout: float | None = None
    ) -> list[ScoreOutput]:
        """log p(continuation | context) for each (context ids, continuation ids) pair, in one
        ``engine.score_batch`` call on the loop thread (the engine packs pairs of one length bucket)."""
        checked = tuple(self._check_score_pair(c, x) for c, x in pairs)
        if not checked:
            return []
        return self._queue_score(_ScoreBatchJob(checked), timeout)

    def _check_score_pair(
        self, context: Sequence[int], continuation: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        context, continuation = tuple(context), tuple(continuation)
        if not context:
            raise InvalidRequestError("context", "context is empty (and the tokenizer adds no BOS)")
        if not continuation:
            raise InvalidRequestError("continuation", "continuation is empty")
        self.check_token_ids("context", context)
        self.check_token_ids("continuation", continuation)
        if len(context) + len(continuation) > self.max_len:
            raise InvalidRequestError(
                "continuation",
                f"context of {len(context)} + continuation of {len(continuation)} tokens exceeds "
                f"max_len={self.max_len}",
            )
        return context, continuation

    def _queue_score(self, job: _ScoreJob | _ScoreBatchJob, timeout: float | None):
        with self._cv:
            self._admission_check(job.tokens)
            self._scores.append(job)
            self._cv.notify_all()
        try:
            return job.future.result(timeout)
        except TimeoutError:
            job.future.cancel()  # the loop skips it if it has not started
            raise

    def _admission_check(self, tokens: int) -> None:
        lim = self.limits
        if not self._accepting or self._stopping or not self.running:
            self.metrics.request_rejected("unavailable")
            raise NotAcceptingError("server is draining or stopped: not accepting new requests")
        waiting = len(self._waiting) + len(self._scores)
        if waiting >= lim.max_queue_requests:
            self.metrics.request_rejected("queue_full")
            raise QueueFullError(
                f"queue full: {waiting} requests waiting (limit max_queue_requests={lim.max_queue_requests})"
            )
        queued = self._waiting_tokens + sum(j.tokens for j in self._scores)
        if queued + tokens > lim.max_queue_tokens:
            self.metrics.request_rejected("queue_full")
            raise QueueFullError(
                f"queue full: {queued} prompt tokens waiting + {tokens} > limit "
                f"max_queue_tokens={lim.max_queue_tokens}"
            )

    def load(self) -> Load:
        with self._lock:
            return Load(
                queue_requests=len(self._waiting) + len(self._scores),
                queue_tokens=self._waiting_tokens,
                active_slots=sum(s is not None for s in self._slots),
                live_requests=self._live,
                accepting=self._accepting,
            )

    def drain(self, grace: float) -> bool:
        """Stop admitting; wait up to ``grace`` seconds for queued and running requests to finish,
        then cancel the rest. True when everything finished on its own."""
        end = time.monotonic() + grace
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
            while self._busy() and (left := end - time.monotonic()) > 0:
                self._cv.wait(left)
            clean = not self._busy()
            if not clean:
                self._abort_all = f"server shutting down: grace period of {grace:g}s elapsed"
                self._cv.notify_all()
                stop_waiting = time.monotonic() + 10.0
                while self._busy() and (left := stop_waiting - time.monotonic()) > 0 and self.running:
                    self._cv.wait(left)
        log.info("drain %s", "complete" if clean else "timed out; remaining requests cancelled")
        return clean

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still live end with finish_reason "cancelled"."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _busy(self) -> bool:
        return self._live > 0 or bool(self._scores)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the loop (scheduler thread only) -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._has_work():
                        self._cv.wait(1.0)
                    if self._stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # never die with requests hanging
                    log.exception("scheduler iteration failed")
                    self._fail_all("error", f"internal scheduler error: {e!r}")
        finally:
            self._fail_all("cancelled", "scheduler stopped")
            self._publish_load()

    def _has_work(self) -> bool:  # under _lock
        return bool(self._waiting or self._scores or self._running or self._inflight)

    def _iteration(self) -> None:
        self._reap()
        self._run_scores()
        self._admit()
        self._prefill()
        dispatched = self._dispatch()
        while len(self._inflight) > (1 if dispatched else 0):
            self._read(self._inflight.popleft())
        self._publish_load()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            abort_all = self._abort_all
            expired = [s for s in self._waiting if abort_all or self._expiry(s, now)]
            for s in expired:
                self._waiting.remove(s)
                self._waiting_tokens -= s.prompt_len
        for s in expired + [s for s in self._running if abort_all or self._expiry(s, now)]:
            if abort_all:
                self._finish(s, "cancelled", message=abort_all)
            else:
                reason = self._expiry(s, now)
                self._finish(s, reason, message=f"request {reason}" if reason == "deadline" else "cancelled by client")

    @staticmethod
    def _expiry(seq: _Seq, now: float) -> str | None:
        if seq.req.deadline is not None and now >= seq.req.deadline - 0.005:
            return "deadline"
        if seq.stream.cancelled:
            return "cancelled"
        return None

    def _run_scores(self) -> None:
        with self._lock:
            jobs, self._scores = list(self._scores), deque()
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                if isinstance(job, _ScoreBatchJob):
                    job.future.set_result(self._score_pairs(job.pairs))
                else:
                    job.future.set_result(self.engine.score(job.context, job.continuation))
            except Exception as e:
                log.exception("score failed")
                job.future.set_exception(e)

    def _score_pairs(self, pairs) -> list[ScoreOutput]:
        batch = getattr(self.engine, "score_batch", None)  # optional in EngineProtocol
        if batch is not None:
            return list(batch(pairs))
        return [self.engine.score(c, x) for c, x in pairs]

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        if not free:
            return
        now = time.monotonic()
        admitted = []
        with self._lock:
            while free and self._waiting:
                seq = self._waiting.popleft()
                self._waiting_tokens -= seq.prompt_len
                seq.slot, seq.state, seq.admitted_at = free.pop(0), _PREFILLING, now
                self._slots[seq.slot] = seq
                admitted.append(seq)
        for seq in admitted:
            self._running.append(seq)
            self.metrics.request_admitted(now - seq.submitted_at, seq.prompt_len)

    def _prefill(self) -> None:
        spent = 0
        pending = [s for s in self._running if s.state == _PREFILLING]
        while pending:
            group = self._group(pending, spent)
            if len(group) > 1:
                n = sum(s.prompt_len for s in group)
                if spent and spent + n > self._budget:
                    return
                self._prefill_group(group)
                spent += n
                del pending[: len(group)]
                continue
            seq = pending.pop(0)
            while seq.state == _PREFILLING:
                start = seq.prefilled
                n = min(self._chunk, seq.prompt_len - start)
                if spent and spent + n > self._budget:
                    return
                last = start + n == seq.prompt_len
                try:
                    first = self.engine.prefill(
                        seq.slot, seq.req.prompt_ids[start : start + n], seq.req.sampling, start=start, last=last
                    )
                except Exception as e:
                    log.exception("request_id=%s prefill failed", seq.rid)
                    self._finish(seq, "error", message=f"prefill failed: {e}")
                    break
                spent += n
                seq.prefilled += n
                if last:
                    seq.state = _DECODING
                    if first is None:
                        self._finish(seq, "error", message="engine returned no token for the last prefill chunk")
                    else:
                        self._apply(seq, first)

    def _group(self, pending: list[_Seq], spent: int) -> list[_Seq]:
        """The leading run of whole, short prompts the engine can prefill in one
        call (engines with ``prefill_many``), within this iteration's budget."""
        limit, rows = self._many_limit, self._many_rows
        group: list[_Seq] = []
        for seq in pending:
            if len(group) == rows or seq.prefilled or seq.prompt_len > limit:
                break
            if group and spent + sum(s.prompt_len for s in group) + seq.prompt_len > self._budget:
                break
            group.append(seq)
        return group

    def _prefill_group(self, group: list[_Seq]) -> None:
        try:
            firsts = self.engine.prefill_many([(s.slot, s.req.prompt_ids, s.req.sampling) for s in group])
        except Exception:
            # one bad prompt must not fail the others: retry each alone, so only it ends in error
            log.exception("prefill of %d prompts failed; prefilling them one at a time", len(group))
            firsts = []
            for seq in group:
                try:
                    firsts.append(self.engine.prefill(seq.slot, seq.req.prompt_ids, seq.req.sampling))
                except Exception as e:
                    log.exception("request_id=%s prefill failed", seq.rid)
                    self._finish(seq, "error", message=f"prefill failed: {e}")
                    firsts.append(None)
        for seq, first in zip(group, firsts):
            if seq.state != _PREFILLING:
                continue
            seq.prefilled = seq.prompt_len
            seq.state = _DECODING
            if first is None:
                self._finish(seq, "error", message="engine returned no token for the prompt")
            else:
                self._apply(seq, first)

    def _dispatch(self) -> bool:
        owners = {
            s.slot: s for s in self._running if s.state == _DECODING and 1 + s.dispatched < s.req.max_tokens
        }
        if not owners:
            return False
        # k steps in one call when every slot has room for them in the cache; a
        # sequence that stops within the k steps ignores the tokens after its stop
        k = self._k
        if k > 1 and any(s.prompt_len + s.dispatched + k > self._cache_len for s in owners.values()):
            k = 1
        try:
            handle = self.engine.decode(sorted(owners), k) if k > 1 else self.engine.decode(sorted(owners))
        except Exception as e:
            log.exception("decode dispatch failed")
            for s in owners.values():
                self._finish(s, "error", message=f"decode step failed: {e}")
            return False
        for s in owners.values():
            s.dispatched += k
        self._inflight.append(_Step(handle, owners, k))
        return True

    def _read(self, step: _Step) -> None:
        try:
            per_step = step.handle.results() if step.steps > 1 else [step.handle.result()]
        except Exception as e:
            log.exception("decode step failed")
            for slot, s in step.owners.items():
                if s.state == _DECODING and self._slots[slot] is s:
                    self._finish(s, "error", message=f"decode step failed: {e}")
            return
        for results in per_step:
            for slot, s in step.owners.items():
                if s.state != _DECODING or self._slots[slot] is not s:
                    continue  # finished or replaced since this step was dispatched: a stale token
                token = results.get(slot)
                if token is None:
                    self._finish(s, "error", message=f"engine returned no token for slot {slot}")
                else:
                    self._apply(s, token)

    def _apply(self, seq: _Seq, st: SlotToken) -> None:
        """One generated token: stop conditions, detokenize, emit."""
        try:
            self._update(seq, st)
        except Exception as e:
            log.exception("request_id=%s update failed", seq.rid)
            self._finish(seq, "error", message=f"while processing token {st.token}: {e}")

    def _update(self, seq: _Seq, st: SlotToken) -> None:
        req, now = seq.req, time.monotonic()
        seq.generated += 1
        self.metrics.tokens_generated(1)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.first_token(now - seq.submitted_at)
        counted = seq.generated >= req.min_tokens
        stop_token = st.token in req.stop_token_ids or (not req.ignore_eos and st.token in self._eos)
        text = "" if stop_token else seq.detok.add([st.token])
        text, hit = seq.matcher.feed(text, check=counted)
        reason = "stop" if hit or (stop_token and counted) else None
        if reason is None and seq.generated >= req.max_tokens:
            reason = "length"
        if reason is not None and not hit:
            tail, hit = seq.matcher.feed(seq.detok.flush(), check=counted)
            text += tail if hit else tail + seq.matcher.flush()
            reason = "stop" if hit else reason
        logprobs = (st,) if req.return_logprobs else ()
        if reason is None:
            seq.stream._put(Event(seq.rid, (st.token,), text, logprobs))
        else:
            self._finish(seq, reason, token_ids=(st.token,), text=text, logprobs=logprobs)

    def _finish(
        self,
        seq: _Seq,
        reason: str,
        *,
        message: str = "",
        token_ids: tuple[int, ...] = (),
        text: str = "",
        logprobs: tuple[SlotToken, ...] = (),
    ) -> None:
        if seq.state == _FINISHED:
            return
        if seq.slot >= 0:
            self._release(seq.slot)
            self._running.remove(seq)
        seq.state = _FINISHED
        now = time.monotonic()
        admitted = seq.admitted_at if seq.admitted_at is not None else now
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.submitted_at
        timings = Timings(queue_s=admitted - seq.submitted_at, ttft_s=ttft, total_s=now - seq.submitted_at)
        usage = Usage(seq.prompt_len, seq.generated)
        seq.stream._put(Event(seq.rid, token_ids, text, logprobs, reason, message, usage, timings))
        tpot = None
        if seq.first_token_at is not None and seq.generated > 1:
            tpot = (now - seq.first_token_at) / (seq.generated - 1)
        self.metrics.request_finished(reason, timings.total_s, tpot)
        with self._cv:
            self._live -= 1
            self._cv.notify_all()
        log.info(
            "request_id=%s finish=%s prompt_tokens=%d completion_tokens=%d queue_ms=%.1f ttft_ms=%s total_ms=%.1f%s",
            seq.rid, reason, usage.prompt_tokens, usage.completion_tokens, timings.queue_s * 1e3,
            "-" if ttft is None else f"{ttft * 1e3:.1f}", timings.total_s * 1e3, f" message={message!r}" if message else "",
        )

    def _release(self, slot: int) -> None:
        with self._lock:
            self._slots[slot] = None
        try:
            self.engine.release(slot)
        except Exception:
            log.exception("engine.release(%d) failed", slot)

    def _fail_all(self, reason: str, message: str) -> None:
        with self._lock:
            waiting, self._waiting, self._waiting_tokens = list(self._waiting), deque(), 0
            scores, self._scores = list(self._scores), deque()
        for job in scores:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotAcceptingError(message))
        for seq in waiting + list(self._running):
            self._finish(seq, reason, message=message)
        self._inflight.clear()

    def _publish_load(self) -> None:
        with self._lock:
            active = [s for s in self._slots if s is not None]
            queue_requests = len(self._waiting) + len(self._scores)
            queue_tokens = self._waiting_tokens
        used = sum(s.prefilled + s.generated for s in active)
        self.metrics.set_load(
            queue_requests=queue_requests,
            queue_tokens=queue_tokens,
            active_slots=len(active),
            num_slots=self.num_slots,
            kv_usage=used / max(1, self.num_slots * self.engine.max_len),
        )
