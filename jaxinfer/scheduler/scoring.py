"""Scoring through pages: log p(continuation | context) with the context's cached prefix reused.

A score runs the context + continuation (less its last token) through freshly allocated pages
after the context's longest cached prefix, in pieces of at most ``prefill_chunk`` positions; the
context's full pages then join the prefix cache and every page is released, so N continuations of
one context compute the context once (while the pool keeps its pages).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from jaxinfer.blocks import BlockManager, OutOfPagesError
from jaxinfer.engine.types import EngineProtocol, ScoreOutput

_SCORE_FIELDS = {f.name for f in dataclasses.fields(ScoreOutput)}
log = logging.getLogger(__name__)


@dataclass(eq=False)
class ScoreJob:
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]
    future: Future = field(default_factory=Future)
    results: list[ScoreOutput] = field(default_factory=list)
    started: bool = False
    deadline: float | None = None  # time.monotonic(); past it the job stops at its next piece

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeoutError("score deadline exceeded: stopped before its next piece")

    @property
    def tokens(self) -> int:
        return sum(len(c) + len(x) for c, x in self.pairs)

    @property
    def results_left(self) -> int:
        return len(self.pairs) - len(self.results)

    @property
    def next_tokens(self) -> int:
        c, x = self.pairs[len(self.results)]
        return len(c) + len(x)


def score_through_pages(
    engine: EngineProtocol, blocks: BlockManager, context: tuple[int, ...], continuation: tuple[int, ...], chunk: int,
    before_piece: Callable[[], None] = lambda: None,
) -> ScoreOutput:
    """One pair on the loop thread. OutOfPagesError (nothing changed) when the pool is short;
    ``before_piece`` runs before each engine call (it raises to stop, e.g. past the deadline)."""
    full = context + continuation
    tokens, targets = full[:-1], full[1:]
    hit, start = blocks.match(context)  # never the whole context: its last token's logits score
    handle = object()
    blocks.allocate(handle, len(tokens), hit, prompt_ids=context)
    try:
        first = len(context) - 1  # the input position whose target is the first continuation token
        lps: list[float] = []
        top_ids: list[int] = []
        top_lps: list[float] = []
        for off in range(start, len(tokens), chunk):
            before_piece()
            out = engine.score(
                tokens[off : off + chunk], targets[off : off + chunk], pages=blocks.table(handle), start=off
            )
            keep = max(0, first - off)
            lps.extend(out.token_logprobs[keep:])
            top_ids.extend(out.top_ids[keep:])
            top_lps.extend(out.top_logprobs[keep:])
        blocks.commit_full_pages(handle, context)
    finally:
        blocks.free(handle)
    greedy = all(t == c for t, c in zip(top_ids, continuation)) and len(top_ids) == len(continuation)
    extra = {"top_ids": tuple(top_ids), "top_logprobs": tuple(top_lps)}
    return ScoreOutput(
        sum(lps), tuple(lps), greedy, context, continuation, **{k: v for k, v in extra.items() if k in _SCORE_FIELDS}
    )


def run_score_jobs(
    jobs: deque[ScoreJob], lock: threading.Lock, engine: EngineProtocol, blocks: BlockManager, chunk: int, budget: int,
    on_error: Callable[[], None] = lambda: None,
) -> bool:
    """Run queued jobs, first come first served, pair by pair, up to ``budget`` tokens (at least
    one pair), so decode steps run between the pairs of a long batch. Returns False while the
    first job waits for pages (the caller holds admissions until it got them). ``jobs`` is
    guarded by ``lock``; the rest belongs to the loop thread. ``on_error`` runs after a pair failed
    (the scheduler checks whether the engine lost its state with it)."""
    spent = 0
    while True:
        with lock:
            if not jobs:
                return True
            job = jobs[0]
        if not job.started and not job.future.set_running_or_notify_cancel():
            with lock:
                jobs.popleft()
            continue
        job.started = True
        try:
            while job.results_left and (not spent or spent + job.next_tokens <= budget):
                spent += job.next_tokens
                ctx, cont = job.pairs[len(job.results)]
                job.results.append(score_through_pages(engine, blocks, ctx, cont, chunk, job.check_deadline))
        except OutOfPagesError:
            return False
        except Exception as e:
            if not isinstance(e, TimeoutError):
                log.exception("score failed")
                on_error()
            job.future.set_exception(e)
            with lock:
                jobs.popleft()
            continue
        if job.results_left:
            return True  # budget spent: decode steps run before the rest
        job.future.set_result(list(job.results))
        with lock:
            jobs.popleft()
