"""Continuous batching over a paged KV cache: the host loop between the front end and the engine.

Host only (this package never imports jax). It talks to the device through
:class:`~jaxinfer.engine.types.EngineProtocol` and knows nothing about gRPC. Memory is pages of
one pool (:class:`~jaxinfer.blocks.BlockManager` decides which sequence holds which); the
engine's ``max_seqs`` decode rows only bound how many sequences decode together.

Pipeline::

    submit(Request)                                          (caller's thread)
      -> validate: non-empty prompt, ids < vocab, prompt + max_tokens <= max_len (engine and model)
         AND <= the pool's pages x page_size (a request that could never fit), min_tokens <=
         max_tokens, SamplingParams.validate, stop strings / ids bounded (InvalidRequestError
         naming the field and the limit; nothing is truncated here)
      -> bounded waiting queue, by requests AND by prompt tokens (QueueFullError at once, with the limit)
      -> RequestStream: the caller iterates its Events; cancel() from any thread

    loop (one thread owns the engine and the block manager; one iteration):
      1. reap      cancelled / past-deadline requests, queued or running -> finished, row and pages freed
      2. score     score jobs: context + continuation through pages, the context's longest cached
                   prefix reused, engine.score in pieces of engine.prefill_chunk, the context's full
                   pages registered in the prefix cache (N continuations compute the context once)
      3. admit     waiting requests, first come first served, while a row is free, the pool has
                   the pages of the whole prompt (after its prefix-cache hit) plus one page of
                   headroom per decoding sequence, and this iteration's prefill budget reaches the
                   request (so it matches the prefix pages the requests before it just committed);
                   otherwise admission holds
      4. prefill   at most `prefill_budget` prompt tokens per iteration, in pieces of at most
                   engine.prefill_chunk from the end of the cached prefix, so a long prompt's chunks
                   interleave with decode steps; each piece's full pages join the prefix cache; the
                   last piece samples the first token. A run of short prompts goes in one call
                   (engine.prefill_many, up to engine.prefill_rows) where the engine offers it
      5. dispatch  grow every decoding sequence's pages to cover length + steps, then
                   engine.decode(rows, page tables) -- returns at once; k steps in one call where
                   the engine has decode_steps = k > 1 and the pool and max_len allow. When the pool
                   is short, the most recently admitted sequence is preempted: its row and pages are
                   freed and it is requeued at the FRONT to be recomputed from prompt + the tokens it
                   generated (its stream just pauses; the prefix cache usually still holds its pages)
      6. read      the PREVIOUS step's handle.result() while the device runs step 5, then update:
                   eos / stop_token_ids / stop strings (held off until min_tokens) / max_tokens
                   -> incremental detokenize; text is held back while it could still be the
                   beginning of a stop string -> Event on the request's stream; finished -> its full
                   pages join the prefix cache, row and pages freed

Reading step k-1 after dispatching step k means a request that finishes in step k-1 also ran in
step k. Each in-flight step therefore remembers which sequence (and which admission of it) owned
each row when it was dispatched, and a result is applied only if that admission still owns the row
and is decoding; a row freed (and maybe re-prefilled) since then just drops the stale token. The
stale step writes only positions past the sequence's known tokens, so into pages never registered
in the prefix cache, which a later owner rewrites before reading (device order). A request is never
dispatched past its own token limit, so the cache is never written beyond max_len.

Failures stay local: an exception while prefilling or updating one request ends that request with
finish_reason "error" (its pages are freed, not cached); a failing decode step ends the requests in
that step. If the engine lost its device state with the failed call (``engine.recover()``: a
program that failed after taking its donated buffers), every other running sequence is requeued
to be recomputed from its tokens, as when preempted, and the prefix cache is forgotten, so the
requests outside that call and the later ones are still served. The loop itself never dies
silently: on an unexpected error it fails what it holds and goes on. Cancellation and deadlines free the row and pages within one engine call: they are
reaped at the top of each iteration, after the score pieces, and between two prefill calls; a score
job past its deadline stops before its next piece.
drain() stops admitting, lets queued and running requests finish within a grace period, then
cancels the rest.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from typing import Callable, Sequence

from jaxinfer.blocks import BlockManager, OutOfPagesError, pages_for
from jaxinfer.engine.types import EngineProtocol, ScoreOutput, SlotToken
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler.requests import (
    DetokenizerLike,
    Event,
    InvalidRequestError,
    Load,
    NotAcceptingError,
    QueueFullError,
    Request,
    RequestStream,
    SchedulerLimits,
    StopStringMatcher,
    Timings,
    TokenizerLike,
    Usage,
)
from jaxinfer.scheduler.scoring import ScoreJob, run_score_jobs
from jaxinfer.scheduler.state import DECODING, FINISHED, PREFILLING, WAITING, Seq, Step
from jaxinfer.scheduler.validation import Capacity, check_token_ids, validate_request, validate_score
from jaxinfer.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


def _real_detokenizer(tokenizer: TokenizerLike) -> DetokenizerLike:
    return IncrementalDetokenizer(tokenizer)


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
        self.max_seqs = int(engine.max_seqs)
        self.page_size = int(engine.page_size)
        self.num_pages = int(engine.num_pages)
        self.capacity = Capacity(self.vocab_size, self.max_len, int(engine.max_len), self.num_pages, self.page_size)
        self.blocks = BlockManager(self.num_pages, self.page_size, enable_prefix_cache=limits.prefix_cache)
        self._chunk = max(1, int(engine.prefill_chunk))
        self._budget = max(1, int(limits.prefill_budget or self._chunk))
        # several short prompts per prefill call, where the engine can
        self._many_limit = int(getattr(engine, "prefill_many_limit", 0)) if hasattr(engine, "prefill_many") else 0
        self._many_rows = int(getattr(engine, "prefill_rows", 1))
        # k decode steps per dispatch where the engine offers it (see _dispatch)
        self._k = max(1, int(getattr(engine, "decode_steps", 1) or 1))
        self._engine_max_len = int(engine.max_len)

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        # guarded by _lock
        self._waiting: deque[Seq] = deque()
        self._waiting_tokens = 0
        self._scores: deque[ScoreJob] = deque()
        self._accepting = True
        self._stopping = False
        self._live = 0
        self._abort_all: str | None = None
        self._active = 0  # rows in use, for load()
        # owned by the loop thread
        self._rows: list[Seq | None] = [None] * self.max_seqs
        self._running: list[Seq] = []  # holding a row, in admission order
        self._inflight: deque[Step] = deque()
        self._thread: threading.Thread | None = None
        self.died: BaseException | None = None  # what escaped the loop itself, when it did
        self._death_callbacks: list[Callable[[BaseException], None]] = []

    # -- public API (any thread) -----------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxinfer-scheduler", daemon=True)
            self._thread.start()
        return self

    @property
    def max_seq_tokens(self) -> int:
        """Longest prompt + max_tokens this scheduler accepts: the context, or the whole pool."""
        return min(self.max_len, self.capacity.pool_tokens)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.died is None

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(exc)`` (on the dying loop thread) if an exception escapes the loop itself:
        liveness turns off and the process exits so an orchestrator restarts it."""
        self._death_callbacks.append(callback)

    def validate(self, req: Request) -> None:
        """Raise InvalidRequestError naming the field and its limit."""
        validate_request(req, self.limits, self.capacity)

    def check_token_ids(self, name: str, ids: Sequence[int]) -> None:
        """InvalidRequestError naming the first id outside [0, vocab_size)."""
        check_token_ids(name, ids, self.vocab_size)

    def submit(self, req: Request) -> RequestStream:
        """Queue a request; raises InvalidRequestError, QueueFullError or NotAcceptingError at once."""
        try:
            self.validate(req)
        except InvalidRequestError:
            self.metrics.request_rejected("invalid")
            raise
        rid = req.request_id or uuid.uuid4().hex
        stream = RequestStream(rid, self)
        seq = Seq(req, rid, stream, self._make_detok(self.tokenizer), StopStringMatcher(req.stop), time.monotonic())
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
        return self.score_batch([(context, continuation)], timeout)[0]

    def score_batch(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], timeout: float | None = None
    ) -> list[ScoreOutput]:
        """log p(continuation | context) for each pair, in order. Pairs sharing a context compute
        its cached pages once (the prefix cache holds them between pairs)."""
        pairs = [(tuple(c), tuple(x)) for c, x in pairs]
        for c, x in pairs:
            validate_score(c, x, self.limits, self.capacity)
        job = ScoreJob(pairs, deadline=None if timeout is None else time.monotonic() + timeout)
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
                active_seqs=self._active,
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
            self._loop()
        except BaseException as e:
            self.died = e
            log.critical("scheduler loop died: %r", e, exc_info=True)
            for callback in self._death_callbacks:
                try:
                    callback(e)
                except Exception:
                    log.exception("scheduler death callback failed")

    def _loop(self) -> None:
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
        scores_done = self._run_scores()
        self._reap()  # deadlines that passed during the score pieces: within one engine call
        if scores_done:  # a score job short of pages holds admissions until it got them
            self._admit()
        self._prefill()
        dispatched = self._dispatch()
        while len(self._inflight) > (1 if dispatched else 0):
            self._read(self._inflight.popleft())
        self._publish_load()

    def _reap(self) -> int:
        """End cancelled and past-deadline requests, queued or running; returns how many."""
        now = time.monotonic()
        with self._lock:
            abort_all = self._abort_all
            expired = [s for s in self._waiting if abort_all or self._expiry(s, now)]
            for s in expired:
                self._waiting.remove(s)
                self._waiting_tokens -= s.prompt_len
        ended = expired + [s for s in self._running if abort_all or self._expiry(s, now)]
        for s in ended:
            if abort_all:
                self._finish(s, "cancelled", message=abort_all)
            else:
                reason = self._expiry(s, now)
                self._finish(s, reason, message=f"request {reason}" if reason == "deadline" else "cancelled by client")
        return len(ended)

    @staticmethod
    def _expiry(seq: Seq, now: float) -> str | None:
        if seq.req.deadline is not None and now >= seq.req.deadline - 0.005:
            return "deadline"
        if seq.stream.cancelled:
            return "cancelled"
        return None

    def _run_scores(self) -> bool:
        """Score pairs within this iteration's token budget. False while a job waits for pages."""
        return run_score_jobs(self._scores, self._lock, self.engine, self.blocks, self._chunk, self._budget,
                              on_error=self._recover_engine)

    def _admit(self) -> None:
        free_rows = [i for i, s in enumerate(self._rows) if s is None]
        now = time.monotonic()
        # admit only what this iteration's prefill reaches: a request admitted later matches the
        # prefix pages the ones before it commit meanwhile (64 requests sharing a system prompt
        # prefill it once, not 64 times side by side), and pages are not held by prompts that wait
        pending = sum(s.to_prefill for s in self._running if s.state == PREFILLING)
        while free_rows and pending < self._budget:
            with self._lock:
                seq = self._waiting[0] if self._waiting else None
            if seq is None:
                return
            fill = seq.req.prompt_ids + tuple(seq.out)
            hit, n_cached = self.blocks.match(fill)
            # headroom: each decoding sequence may need one more page before the next admission
            decoding = sum(1 for s in self._running if s.state == DECODING)
            need = self.blocks.needed(len(fill), hit)
            if need + (decoding if self._running else 0) > self.blocks.available:
                return  # hold admissions until pages are freed
            with self._lock:
                self._waiting.popleft()
                self._waiting_tokens -= seq.prompt_len
                self._active += 1
            first = seq.admitted_at is None
            self.blocks.allocate(seq, len(fill), hit, prompt_ids=fill)
            seq.row, seq.state, seq.fill, seq.prefilled, seq.dispatched = free_rows.pop(0), PREFILLING, fill, n_cached, 0
            seq.epoch += 1
            self._rows[seq.row] = seq
            self._running.append(seq)
            pending += seq.to_prefill
            if first:
                seq.admitted_at, seq.cached_tokens = now, n_cached
                self.metrics.request_admitted(now - seq.submitted_at, seq.prompt_len)
            self.metrics.prefix_lookup(len(fill), n_cached)

    def _prefill(self) -> None:
        spent = 0
        pending = [s for s in self._running if s.state == PREFILLING]
        while pending:
            group = self._group(pending, spent)
            if len(group) > 1:
                n = sum(s.to_prefill for s in group)
                if spent and spent + n > self._budget:
                    return
                if spent and self._reaped(pending):
                    continue
                self._prefill_group(group)
                spent += n
                pending[:] = [s for s in pending[len(group) :] if s.state == PREFILLING]
                continue
            seq = pending.pop(0)
            while seq.state == PREFILLING:
                start = seq.prefilled
                n = min(self._chunk, len(seq.fill) - start)
                if spent and spent + n > self._budget:
                    return
                last = start + n == len(seq.fill)
                if spent and self._reaped(pending) and seq.state != PREFILLING:
                    break
                try:
                    first = self.engine.prefill(
                        seq.row, seq.fill[start : start + n], seq.req.sampling,
                        pages=tuple(self.blocks.table(seq)), start=start, last=last,
                    )
                except Exception as e:
                    log.exception("request_id=%s prefill failed", seq.rid)
                    self._engine_error([seq], f"prefill failed: {e}")
                    pending[:] = [s for s in pending if s.state == PREFILLING]
                    break
                spent += n
                self._prefilled(seq, start + n, first if last else None, last)

    def _reaped(self, pending: list[Seq]) -> bool:
        """Between two prefill calls of one iteration: end what was cancelled or passed its
        deadline meanwhile (so a deadline waits at most one engine call), and drop it from
        ``pending``. True when something ended."""
        ended = self._reap()
        pending[:] = [s for s in pending if s.state == PREFILLING]
        return ended > 0

    def _prefilled(self, seq: Seq, upto: int, first: SlotToken | None, last: bool) -> None:
        seq.prefilled = upto
        self.blocks.commit_full_pages(seq, seq.fill[:upto])
        if not last:
            return
        seq.state = DECODING
        if first is None:
            self._finish(seq, "error", message="engine returned no token for the last prefill piece")
        else:
            self._apply(seq, first)

    def _group(self, pending: list[Seq], spent: int) -> list[Seq]:
        """The leading run of short prompt remainders the engine can prefill in one call
        (engines with ``prefill_many``), within this iteration's budget."""
        limit, rows = self._many_limit, self._many_rows
        group: list[Seq] = []
        for seq in pending:
            if len(group) == rows or seq.to_prefill > limit:
                break
            if group and spent + sum(s.to_prefill for s in group) + seq.to_prefill > self._budget:
                break
            group.append(seq)
        return group

    def _prefill_group(self, group: list[Seq]) -> None:
        items = [(s.row, s.fill[s.prefilled :], s.req.sampling, s.prefilled, tuple(self.blocks.table(s))) for s in group]
        try:
            firsts = self.engine.prefill_many(items)
        except Exception as e:
            log.exception("prefill of %d prompts failed; prefilling them one at a time", len(group))
            if self._engine_lost():  # the call took the pool with it: it ends its requests, no retry
                self._engine_error(group, f"prefill failed: {e}", lost=True)
                return
            # one bad prompt must not fail the others: retry each alone, so only it ends in error
            firsts = []
            for seq, (row, tokens, params, start, pages) in zip(group, items):
                if seq.state != PREFILLING:  # requeued: an earlier retry lost the engine's state
                    firsts.append(None)
                    continue
                try:
                    firsts.append(self.engine.prefill(row, tokens, params, pages=pages, start=start))
                except Exception as e:
                    log.exception("request_id=%s prefill failed", seq.rid)
                    self._engine_error([seq], f"prefill failed: {e}")
                    firsts.append(None)
        for seq, first in zip(group, firsts):
            if seq.state == PREFILLING:
                self._prefilled(seq, len(seq.fill), first, True)

    def _dispatch(self) -> bool:
        cands = [s for s in self._running if s.state == DECODING and s.may_decode]
        if not cands:
            return False
        # k steps in one call when every row has room for them (max_len) and the pool has the
        # pages without preempting; a sequence that stops within the k steps ignores the rest
        k = self._k
        if k > 1:
            ps = self.page_size
            extra = sum(max(0, pages_for(s.length + k, ps) - len(self.blocks.table(s))) for s in cands)
            if any(s.length + k > self._engine_max_len for s in cands) or extra > self.blocks.available:
                k = 1
        owners: dict[int, Seq] = {}
        for s in cands:
            while s.state == DECODING:
                try:
                    self.blocks.append(s, s.length + k)
                    owners[s.row] = s
                    break
                except OutOfPagesError:
                    self._preempt(self._running[-1])  # the newest: s itself or one admitted after it
        if not owners:
            return False
        rows = sorted(owners)
        pages = {r: tuple(self.blocks.table(owners[r])) for r in rows}  # snapshots: the tables grow later
        try:
            handle = self.engine.decode(rows, pages, k) if k > 1 else self.engine.decode(rows, pages)
        except Exception as e:
            log.exception("decode dispatch failed")
            self._engine_error(list(owners.values()), f"decode step failed: {e}")
            return False
        for s in owners.values():
            s.dispatched += k
        self._inflight.append(Step(handle, {r: (s, s.epoch) for r, s in owners.items()}, k))
        return True

    def _engine_lost(self) -> bool:
        """After a failed engine call: did the engine lose its device state with it?"""
        recover = getattr(self.engine, "recover", None)
        return bool(recover is not None and recover())

    def _engine_error(self, seqs: Sequence[Seq], message: str, *, lost: bool | None = None) -> None:
        """End ``seqs``, the requests of a failed engine call, in error; then recover the rest."""
        for s in seqs:
            self._finish(s, "error", message=message)
        self._recover_engine(lost)

    def _recover_engine(self, lost: bool | None = None) -> None:
        """If the engine lost its device state (every page's contents), recompute every running
        sequence from its tokens, as if preempted, and forget the prefix cache."""
        if not (self._engine_lost() if lost is None else lost):
            return
        running = list(self._running)
        log.error("the engine lost its device state: %d running requests requeued to be recomputed, "
                  "prefix cache cleared", len(running))
        self._inflight.clear()  # their owners are requeued under a new epoch: any result would be stale
        for seq in reversed(running):  # each goes to the front: the first admitted ends up first
            self._preempt(seq, "the engine lost its device state", cache=False)  # the pool holds nothing now
        self.blocks.reset_prefix_cache()

    def _preempt(self, seq: Seq, why: str = "pool short of pages", cache: bool = True) -> None:
        """Free a running sequence's row and pages; requeue it first, to be recomputed from its
        prompt + the tokens it generated. Its in-flight tokens are dropped as stale."""
        log.info("request_id=%s preempted at %d generated tokens (%s)", seq.rid, seq.generated, why)
        if cache:
            self.blocks.commit_full_pages(seq, seq.written)  # its recompute will likely find them still cached
        self._release(seq)
        seq.state = WAITING
        seq.preemptions += 1
        self.metrics.preempted()
        with self._lock:
            self._waiting.appendleft(seq)
            self._waiting_tokens += seq.prompt_len

    def _read(self, step: Step) -> None:
        try:
            per_step = step.handle.results() if step.steps > 1 else [step.handle.result()]
        except Exception as e:
            log.exception("decode step failed")
            owners = [s for s, epoch in step.owners.values() if s.state == DECODING and s.epoch == epoch]
            self._engine_error(owners, f"decode step failed: {e}")
            return
        for results in per_step:
            for row, (s, epoch) in step.owners.items():
                if s.state != DECODING or s.epoch != epoch:
                    continue  # finished, preempted or replaced since this step was dispatched: stale
                token = results.get(row)
                if token is None:
                    self._finish(s, "error", message=f"engine returned no token for row {row}")
                else:
                    self._apply(s, token)

    def _apply(self, seq: Seq, st: SlotToken) -> None:
        """One generated token: stop conditions, detokenize, emit."""
        try:
            self._update(seq, st)
        except Exception as e:
            log.exception("request_id=%s update failed", seq.rid)
            self._finish(seq, "error", message=f"while processing token {st.token}: {e}")

    def _update(self, seq: Seq, st: SlotToken) -> None:
        req, now = seq.req, time.monotonic()
        seq.out.append(st.token)
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
        seq: Seq,
        reason: str,
        *,
        message: str = "",
        token_ids: tuple[int, ...] = (),
        text: str = "",
        logprobs: tuple[SlotToken, ...] = (),
    ) -> None:
        if seq.state == FINISHED:
            return
        if seq.row >= 0:
            if reason != "error":  # an error may leave a piece half written: cache nothing of it
                self.blocks.commit_full_pages(seq, seq.written)
            self._release(seq)
        seq.state = FINISHED
        now = time.monotonic()
        admitted = seq.admitted_at if seq.admitted_at is not None else now
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.submitted_at
        timings = Timings(queue_s=admitted - seq.submitted_at, ttft_s=ttft, total_s=now - seq.submitted_at)
        usage = Usage(seq.prompt_len, seq.generated, seq.cached_tokens)
        seq.stream._put(Event(seq.rid, token_ids, text, logprobs, reason, message, usage, timings))
        tpot = None
        if seq.first_token_at is not None and seq.generated > 1:
            tpot = (now - seq.first_token_at) / (seq.generated - 1)
        self.metrics.request_finished(reason, timings.total_s, tpot)
        with self._cv:
            self._live -= 1
            self._cv.notify_all()
        log.info(
            "request_id=%s finish=%s prompt_tokens=%d cached_tokens=%d completion_tokens=%d preemptions=%d "
            "queue_ms=%.1f ttft_ms=%s total_ms=%.1f%s",
            seq.rid, reason, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, seq.preemptions,
            timings.queue_s * 1e3, "-" if ttft is None else f"{ttft * 1e3:.1f}", timings.total_s * 1e3,
            f" message={message!r}" if message else "",
        )

    def _release(self, seq: Seq) -> None:
        """Give back a running sequence's row (engine state) and pages (block manager)."""
        row = seq.row
        self._rows[row] = None
        self._running.remove(seq)
        self.blocks.free(seq)
        seq.row = -1
        with self._lock:
            self._active -= 1
        try:
            self.engine.release(row)
        except Exception:
            log.exception("engine.release(%d) failed", row)

    def _fail_all(self, reason: str, message: str) -> None:
        with self._lock:
            waiting, self._waiting, self._waiting_tokens = list(self._waiting), deque(), 0
            scores, self._scores = list(self._scores), deque()
        for job in scores:
            if job.started or job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotAcceptingError(message))
        for seq in waiting + list(self._running):
            self._finish(seq, reason, message=message)
        self._inflight.clear()

    def _publish_load(self) -> None:
        with self._lock:
            queue_requests = len(self._waiting) + len(self._scores)
            queue_tokens = self._waiting_tokens
        self.metrics.set_load(
            queue_requests=queue_requests,
            queue_tokens=queue_tokens,
            active_seqs=len(self._running),
            max_seqs=self.max_seqs,
            pages=self.blocks.stats(),
        )
