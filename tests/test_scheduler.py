"""Scheduler against the hand-computable paged fake engine of ``tests.helpers.fakes`` (its docstring
says what it checks), plus the real tiny engine for prefix hits and preemption."""

from __future__ import annotations

import random
import threading
import time
from typing import Sequence

import pytest

from jaxinfer.engine.types import SamplingParams
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import (
    Event,
    InvalidRequestError,
    NotAcceptingError,
    QueueFullError,
    Request,
    Scheduler,
    SchedulerLimits,
    StopStringMatcher,
)

from tests.helpers import wait_for
from tests.helpers.fakes import (
    BOS,
    EOS,
    V,
    FakeDetokenizer,
    FakeEngine,
    FakeTokenizer,
    GroupingFakeEngine,
    MultiStepFakeEngine,
    expected,
    logprob_of,
)


def make(engine: FakeEngine | None = None, tok: FakeTokenizer | None = None, **limits) -> Scheduler:
    tok = tok or FakeTokenizer()
    return Scheduler(
        engine or FakeEngine(), tok, SchedulerLimits(**limits), metrics=Metrics(), detokenizer=FakeDetokenizer
    ).start()


def collect(stream) -> tuple[list[Event], list[int], str, Event]:
    events = list(stream)
    ids = [t for e in events for t in e.token_ids]
    return events, ids, "".join(e.text for e in events), events[-1]


def ids(text: str) -> tuple[int, ...]:
    return tuple(FakeTokenizer().encode(text))


@pytest.fixture
def sched():
    s = make()
    yield s
    s.close()
    assert s.engine.violations == []


def assert_idle(s: Scheduler) -> None:
    wait_for(lambda: s.load().live_requests == 0)
    load = s.load()
    assert (load.active_seqs, load.queue_requests, load.queue_tokens) == (0, 0, 0)
    assert s.engine.active_rows() == 0
    wait_for(lambda: s.blocks.stats().used == 0)  # every page free or cached once nothing runs
    pages = s.blocks.stats()
    assert pages.free + pages.cached == s.num_pages
    started = s.metrics.value("jaxinfer_requests_started_total")
    assert started == sum(s.metrics.finished_by_reason().values())


# -- stop strings ------------------------------------------------------------------------------------


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopStringMatcher(["fg", "xyz"])
    assert m.feed("de") == ("de", False)
    assert m.feed("f") == ("", False)  # could be "fg"
    assert m.feed("x") == ("f", False)  # "fx" is no prefix; "x" could be "xyz"
    assert m.feed("yq") == ("xyq", False)
    assert m.feed("abf") == ("ab", False)
    assert m.feed("gh") == ("", True)  # "fg" completed: nothing after it
    m = StopStringMatcher(["ab"])
    assert m.feed("xxa") == ("xx", False)
    assert m.flush() == "a"
    assert StopStringMatcher(["c", "abc"]).feed("zabc") == ("z", True)  # earliest match wins
    assert StopStringMatcher(["ab"]).feed("ab", check=False) == ("ab", False)


# -- generation --------------------------------------------------------------------------------------


def test_plain_generation_is_hand_computable(sched):
    events, out, text, last = collect(sched.submit(Request(ids("abc"), max_tokens=5, request_id="r1")))
    assert out == [ord(c) - 32 for c in "defgh"] == expected(ids("abc"), 5)
    assert text == "defgh"
    assert [e.token_ids for e in events] == [(t,) for t in out]  # one event per token
    assert last.finish_reason == "length" and last.request_id == "r1"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 5)
    assert last.timings.ttft_s is not None and 0 <= last.timings.queue_s <= last.timings.ttft_s <= last.timings.total_s
    assert all(e.logprobs == () for e in events)
    assert_idle(sched)


def test_logprobs_with_top_alternatives(sched):
    req = Request(ids("a"), max_tokens=3, sampling=SamplingParams(logprobs=2), return_logprobs=True)
    events, out, _, _ = collect(sched.submit(req))
    lps = [lp for e in events for lp in e.logprobs]
    assert [lp.token for lp in lps] == out
    seqs = [list(ids("a")) + out[:i] for i in range(3)]  # what the engine read for each token
    assert [lp.logprob for lp in lps] == [logprob_of(q) for q in seqs]
    lp0 = logprob_of(seqs[0])
    assert lps[0].top_ids == (out[0], out[0] + 1) and lps[0].top_logprobs == (lp0, lp0 - 1)


def test_eos_stops_and_ignore_eos_continues(sched):
    _, out, text, last = collect(sched.submit(Request((94,), max_tokens=10)))  # "~" -> BOS, EOS
    assert out == [BOS, EOS] and text == "" and last.finish_reason == "stop"
    _, out, text, last = collect(sched.submit(Request((94,), max_tokens=4, ignore_eos=True)))
    assert out == [BOS, EOS, 0, 1] and text == " !" and last.finish_reason == "length"


def test_stop_token_ids(sched):
    _, out, text, last = collect(sched.submit(Request(ids("a"), max_tokens=10, stop_token_ids=(ord("d") - 32,))))
    assert text == "bc" and out[-1] == ord("d") - 32 and last.finish_reason == "stop"
    assert last.usage.completion_tokens == 3


def test_stop_string_held_back_then_cut(sched):
    events, out, text, last = collect(sched.submit(Request(ids("c"), max_tokens=10, stop=("fg",))))
    assert [e.text for e in events] == ["d", "e", "", ""]  # "f" held back, "fg" completes the stop
    assert text == "de" and len(out) == 4 and last.finish_reason == "stop"
    events, _, text, last = collect(sched.submit(Request(ids("c"), max_tokens=10, stop=("fx",))))
    assert [e.text for e in events[:4]] == ["d", "e", "", "fg"]  # "f" released once it can't be "fx"
    assert text == "defghijklm" and last.finish_reason == "length"
    _, _, text, last = collect(sched.submit(Request(ids("c"), max_tokens=3, stop=("fx",))))
    assert text == "def" and last.finish_reason == "length"  # held text released at the end


def test_min_tokens_holds_off_stop_conditions(sched):
    _, out, text, last = collect(sched.submit(Request((94,), max_tokens=6, min_tokens=4)))
    assert out == [BOS, EOS, 0, 1, 2, 3] and text == ' !"#' and last.finish_reason == "length"
    _, out, text, last = collect(sched.submit(Request(ids("a"), max_tokens=8, min_tokens=3, stop=("b", "e"))))
    assert text == "bc" + "d" and last.finish_reason == "stop"  # "b" in the first 3 tokens doesn't count


@pytest.mark.parametrize(
    "req, field, needle",
    [
        (Request((), max_tokens=4), "prompt", "empty"),
        (Request((1, V), max_tokens=4), "prompt_token_ids", f"prompt_token_ids[1]={V} is out of range"),
        (Request((1, -1), max_tokens=4), "prompt_token_ids", "out of range"),
        (Request((1,), max_tokens=0), "max_tokens", "max_tokens=0 must be >= 1"),
        (Request((1,) * 60, max_tokens=5), "max_tokens", "exceeds the context limit max_len=64"),
        (Request((1,), max_tokens=4, min_tokens=5), "min_tokens", "min_tokens=5 must be in [0, max_tokens=4]"),
        (Request((1,), 4, SamplingParams(temperature=-1.0)), "temperature", "temperature=-1.0 must be in [0, 100]"),
        (Request((1,), 4, SamplingParams(top_p=0.0)), "top_p", "top_p=0.0"),
        (Request((1,), 4, SamplingParams(top_k=V + 1)), "top_k", f"must be in [0, {V}]"),
        (Request((1,), 4, SamplingParams(logprobs=21), return_logprobs=True), "logprobs", "[0, 20]"),
        (Request((1,), 4, SamplingParams(logprobs=2)), "logprobs", "return_logprobs is off"),
        (Request((1,), 4, stop=("x",) * 17), "stop", "17 stop strings (limit 16)"),
        (Request((1,), 4, stop=("",)), "stop", "stop[0] has 0 characters"),
        (Request((1,), 4, stop=("x" * 257,)), "stop", "must be 1..256"),
        (Request((1,), 4, stop_token_ids=(V,)), "stop_token_ids", "out of range"),
        (Request((1,), 4, request_id="x" * 300), "request_id", "limit 256"),
    ],
)
def test_invalid_requests_name_field_and_limit(sched, req, field, needle):
    with pytest.raises(InvalidRequestError) as e:
        sched.submit(req)
    assert e.value.field == field and needle in str(e.value)
    assert sched.load().live_requests == 0


def test_model_limit_tighter_than_engine():
    s = make(model_max_len=16)
    try:
        with pytest.raises(InvalidRequestError, match="max_len=16 .*model limit=16"):
            s.submit(Request((1,) * 10, max_tokens=7))
        assert collect(s.submit(Request((1,) * 10, max_tokens=6)))[3].finish_reason == "length"
    finally:
        s.close()


# -- batching ----------------------------------------------------------------------------------------


def test_32_concurrent_streams_equal_solo_runs():
    rng = random.Random(0)
    reqs = []
    for i in range(32):
        prompt = tuple(rng.randrange(0, 95) for _ in range(rng.randrange(1, 20)))
        reqs.append(Request(prompt, max_tokens=rng.randrange(1, 30), request_id=f"r{i}", stop=("~",) if i % 5 == 0 else ()))
    solo = {}
    s = make(FakeEngine(max_seqs=1))
    for r in reqs:
        solo[r.request_id] = collect(s.submit(r))
    s.close()
    s = make(FakeEngine(max_seqs=4, prefill_chunk=4), max_queue_requests=64)
    streams = [s.submit(r) for r in reqs]
    results = {}
    threads = [threading.Thread(target=lambda st=st: results.__setitem__(st.request_id, collect(st))) for st in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in reqs:
        a, b = solo[r.request_id], results[r.request_id]
        assert (a[1], a[2], a[3].finish_reason) == (b[1], b[2], b[3].finish_reason), r.request_id
        eos = expected(r.prompt_ids, r.max_tokens)
        assert b[1] == eos[: len(b[1])]
    assert_idle(s)
    assert s.engine.violations == []
    s.close()


def test_long_prompt_chunks_interleave_with_running_decode():
    eng = FakeEngine(max_seqs=2, max_len=128, prefill_chunk=4, step_delay=0.002)
    s = make(eng)
    a = s.submit(Request(ids("a"), max_tokens=80, ignore_eos=True))
    it = iter(a)
    for _ in range(3):
        next(it)  # A is streaming
    b = s.submit(Request((5,) * 21, max_tokens=2))  # 6 chunks of <= 4
    _, out_b, _, last_b = collect(b)
    assert last_b.finish_reason == "length" and out_b == [6, 7]
    chunks = [i for i, c in enumerate(eng.calls) if c[0] == "prefill" and c[1] == 1]
    assert len(chunks) == 6
    between = [c for c in eng.calls[chunks[0] : chunks[-1]] if c[0] == "decode"]
    assert len(between) >= 5 and all(0 in c[1] for c in between)  # A decoded between every chunk
    rest = list(it)
    assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == 80
    assert_idle(s)
    s.close()


def test_short_whole_prompts_share_one_prefill_call():
    """A run of short whole prompts admitted together is prefilled in one
    prefill_many call (at most prefill_rows, within the budget); a long prompt
    breaks the run and is chunked as usual. When a group's call fails, its
    prompts are retried one at a time, so only the bad one ends in error."""
    eng = GroupingFakeEngine(max_seqs=8, max_len=64, prefill_chunk=8, fail_prefill_token=90)
    hold = eng.hold = threading.Event()
    s = make(eng, prefill_budget=64)
    blocker = s.submit(Request((9,) * 5, max_tokens=3, ignore_eos=True))  # slot 0; its prefill waits for hold
    wait_for(lambda: eng.hold is None)  # the loop is inside that prefill: the next ones are admitted together
    prompts = [(11, 12, 13), (21, 22), (31, 32, 33, 34), (41,), (5,) * 10, (61, 62), (71, 90)]
    streams = [s.submit(Request(p, max_tokens=3, ignore_eos=True)) for p in prompts]
    hold.set()
    try:
        results = [collect(st) for st in streams]
        assert collect(blocker)[3].finish_reason == "length"
    finally:
        s.close()
    for p, (_, out, _, last) in zip(prompts[:6], results):
        assert last.finish_reason == "length" and out == expected(p, 3, eos=False)
    last = results[6][3]
    assert last.finish_reason == "error" and "injected prefill failure" in last.message
    groups = [c[1] for c in eng.calls if c[0] == "prefill_many"]
    assert groups == [(1, 2, 3), (6, 7)]  # 3 per call; slot 4 alone before the 10-token prompt (slot 5)
    alone = [c[1] for c in eng.calls if c[0] == "prefill" and c[2] == 0]
    assert alone == [0, 1, 2, 3, 4, 5, 6, 7]  # this fake's group call runs prefill per prompt; 6, 7 retried
    long = [c for c in eng.calls if c[0] == "prefill" and c[1] == 5]
    assert [c[2:5] for c in long] == [(0, 8, False), (8, 2, True)]
    assert eng.violations == [] and eng.active_rows() == 0


def test_multi_step_decode_gives_the_same_streams():
    """With an engine that runs 3 steps per call, every stream is what single
    steps give: a sequence that stops inside a call (EOS, a stop token,
    max_tokens) ignores the tokens after its stop, and a slot too near the end
    of the cache for 3 more steps makes the scheduler dispatch one at a time."""
    eng = MultiStepFakeEngine(max_seqs=4, max_len=24, prefill_chunk=8)
    s = make(eng, max_queue_requests=100)
    rng = random.Random(7)
    reqs = [Request(tuple(rng.randrange(0, 95) for _ in range(rng.randrange(1, 8))), max_tokens=rng.randrange(1, 12))
            for _ in range(40)]
    reqs.append(Request((94,), max_tokens=10))  # 95 = BOS, 96 = EOS: stops at the second token
    reqs.append(Request((10,), max_tokens=10, stop_token_ids=(14,)))  # stops at the fourth
    reqs.append(Request((1, 2, 3, 4), max_tokens=20, ignore_eos=True))  # 3 steps at 18 would pass max_len 24
    try:
        for r, st in zip(reqs, [s.submit(r) for r in reqs]):
            _, out, _, last = collect(st)
            want = expected(r.prompt_ids, r.max_tokens, eos=not r.ignore_eos)
            if r.stop_token_ids:
                want = want[: want.index(14) + 1]
            assert out == want, r
            assert last.usage.completion_tokens == len(want)
        assert_idle(s)
    finally:
        s.close()
    kinds = [c[0] for c in eng.calls]
    assert kinds.count("decode_k") > 10 and kinds.count("decode_1") >= 1  # single steps near max_len
    assert eng.violations == [] and eng.active_rows() == 0


def test_slot_reuse_with_pipelined_decode_drops_stale_tokens():
    # 2 slots, many short requests: slots are freed and re-prefilled while a step is in flight.
    eng = FakeEngine(max_seqs=2, prefill_chunk=3)
    s = make(eng, max_queue_requests=200)
    rng = random.Random(1)
    reqs = [Request(tuple(rng.randrange(0, 95) for _ in range(rng.randrange(1, 8))), max_tokens=rng.randrange(1, 6))
            for _ in range(100)]
    streams = [s.submit(r) for r in reqs]
    for r, st in zip(reqs, streams):
        _, out, _, last = collect(st)
        assert out == expected(r.prompt_ids, r.max_tokens)
    assert_idle(s)
    assert eng.violations == []
    s.close()


# -- faults ------------------------------------------------------------------------------------------


def decodes_with(eng: FakeEngine, slot: int, after: float) -> int:
    return sum(1 for c in eng.calls if c[0] == "decode" and slot in c[1] and c[2] > after)


def test_cancel_frees_slot_within_one_step():
    eng = FakeEngine(max_seqs=2, max_len=512, step_delay=0.005)
    s = make(eng)
    keep = s.submit(Request(ids("a"), max_tokens=200, ignore_eos=True))
    st = s.submit(Request(ids("b"), max_tokens=200, ignore_eos=True))
    it = iter(st)
    for _ in range(5):
        next(it)
    t_cancel = time.monotonic()
    st.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].usage.completion_tokens < 200
    slot = 1
    assert decodes_with(eng, slot, t_cancel) <= 1  # at most the step dispatched while cancelling
    assert any(c[0] == "release" and c[1] == slot and c[2] >= t_cancel for c in eng.calls)
    wait_for(lambda: s.load().active_seqs == 1)
    keep.cancel()
    assert collect(keep)[3].finish_reason == "cancelled"
    assert_idle(s)
    s.close()


def test_deadline_frees_slot_and_queued_requests_expire():
    eng = FakeEngine(max_seqs=1, max_len=512, step_delay=0.004)
    s = make(eng)
    st = s.submit(Request(ids("a"), max_tokens=300, ignore_eos=True, deadline=time.monotonic() + 0.1))
    queued = s.submit(Request(ids("b"), max_tokens=3, deadline=time.monotonic() + 0.02))  # never gets the slot
    _, _, _, last_q = collect(queued)
    assert last_q.finish_reason == "deadline" and last_q.usage.completion_tokens == 0 and last_q.timings.ttft_s is None
    _, out, _, last = collect(st)
    assert last.finish_reason == "deadline" and 0 < len(out) < 300
    assert decodes_with(eng, 0, time.monotonic()) == 0
    assert_idle(s)
    s.close()


def test_queue_bounded_by_requests_and_tokens():
    eng = FakeEngine(max_seqs=1)
    eng.gate = threading.Event()  # decode results wait: the slot stays busy
    s = make(eng, max_queue_requests=2, max_queue_tokens=10)
    busy = s.submit(Request(ids("a"), max_tokens=5))
    wait_for(lambda: s.load().active_seqs == 1)
    q1 = s.submit(Request((1, 2, 3), max_tokens=2))
    with pytest.raises(QueueFullError, match=r"prompt tokens waiting \+ 8 > limit max_queue_tokens=10"):
        s.submit(Request((1,) * 8, max_tokens=2))
    q2 = s.submit(Request((1, 2), max_tokens=2))
    with pytest.raises(QueueFullError, match="2 requests waiting .limit max_queue_requests=2"):
        s.submit(Request((1,), max_tokens=2))
    assert s.load().queue_requests == 2 and s.load().queue_tokens == 5
    assert s.metrics.value("jaxinfer_requests_rejected_total", {"cause": "queue_full"}) == 2
    eng.gate.set()
    for st in (busy, q1, q2):
        assert collect(st)[3].finish_reason == "length"
    assert_idle(s)
    s.close()


def test_one_failing_request_does_not_disturb_others():
    eng = FakeEngine(max_seqs=4, fail_prefill_token=90)
    tok = FakeTokenizer(poison=[ord("#") - 32])
    s = make(eng, tok)
    good = [s.submit(Request(ids(p), max_tokens=6)) for p in ("a", "k", "p")]
    bad_prefill = s.submit(Request((1, 90, 2), max_tokens=6))
    bad_detok = s.submit(Request(ids("!"), max_tokens=6))  # second token is "#"
    for st in good:
        assert collect(st)[3].finish_reason == "length"
    last = collect(bad_prefill)[3]
    assert last.finish_reason == "error" and "injected prefill failure" in last.message
    events, _, text, last = collect(bad_detok)
    assert last.finish_reason == "error" and "cannot decode token 3" in last.message and text == '"'
    assert_idle(s)
    assert s.metrics.finished_by_reason()["error"] == 2
    s.close()


def test_failed_decode_step_ends_its_requests_only():
    eng = FakeEngine(max_seqs=2, step_delay=0.002)
    s = make(eng)
    a = s.submit(Request(ids("a"), max_tokens=20))
    it = iter(a)
    next(it)
    next(it)
    eng.fail_next_decode = True
    assert list(it)[-1].finish_reason == "error"
    assert collect(s.submit(Request(ids("a"), max_tokens=3)))[2] == "bcd"
    assert_idle(s)
    s.close()


def test_drain_finishes_inflight_and_refuses_new():
    eng = FakeEngine(max_seqs=2, step_delay=0.002)
    s = make(eng)
    running = [s.submit(Request(ids("a"), max_tokens=20)) for _ in range(3)]  # one waits in the queue
    results = []
    t = threading.Thread(target=lambda: results.extend(collect(st)[3].finish_reason for st in running))
    t.start()
    assert s.drain(grace=10) is True
    with pytest.raises(NotAcceptingError):
        s.submit(Request(ids("a"), max_tokens=2))
    t.join(10)
    assert results == ["length"] * 3
    s.close()


def test_drain_grace_elapsed_cancels_the_rest():
    eng = FakeEngine(max_seqs=1, max_len=4096, step_delay=0.005)
    s = make(eng)
    st = s.submit(Request(ids("a"), max_tokens=4000, ignore_eos=True))
    next(iter(st))
    assert s.drain(grace=0.05) is False
    last = collect(st)[3]
    assert last.finish_reason == "cancelled" and "grace period" in last.message
    assert_idle(s)
    s.close()


def test_close_ends_live_streams():
    eng = FakeEngine(max_seqs=1)
    eng.gate = threading.Event()
    s = make(eng)
    st = s.submit(Request(ids("a"), max_tokens=5))
    wait_for(lambda: s.load().active_seqs == 1)
    closer = threading.Thread(target=s.close)
    closer.start()
    eng.gate.set()
    closer.join(10)
    assert collect(st)[3].finish_reason in ("cancelled", "length")
    with pytest.raises(NotAcceptingError):
        s.submit(Request(ids("a"), max_tokens=2))


# -- scoring -----------------------------------------------------------------------------------------


def test_score_runs_on_the_loop_thread_between_steps(sched):
    streams = [sched.submit(Request(ids("a"), max_tokens=30, ignore_eos=True)) for _ in range(3)]
    out = sched.score(ids("ab"), ids("cdx")[1:])
    assert out.token_logprobs == (-1.0, -1.0, -5.0) and out.logprob == -7.0 and not out.is_greedy
    assert sched.score((5,), (6, 7)).is_greedy
    with pytest.raises(InvalidRequestError, match="continuation is empty"):
        sched.score((5,), ())
    with pytest.raises(InvalidRequestError, match="= 65 exceeds the context limit max_len=64"):
        sched.score((5,) * 60, (6,) * 5)
    for st in streams:
        collect(st)
    assert sched.engine.violations == []


# -- pages: prefix cache, preemption, pool limits -----------------------------------------------------


def run_all(s: Scheduler, reqs: list[Request]) -> list[tuple[list[int], list[float], Event]]:
    """Submit every request at once and collect (tokens, logprobs, last event) of each."""
    streams = [s.submit(r) for r in reqs]
    out = []
    for st in streams:
        events, toks, _, last = collect(st)
        out.append((toks, [lp.logprob for e in events for lp in e.logprobs], last))
    return out


def test_prefix_hit_prefills_only_the_suffix_and_gives_the_same_stream():
    system = tuple(range(10, 30))  # 20 tokens: 5 full pages of 4
    reqs = [Request(system + (40 + i, 41 + i), max_tokens=6, return_logprobs=True, ignore_eos=True) for i in range(3)]
    results = {}
    for cache in (False, True):
        eng = FakeEngine(max_seqs=1, max_len=64, prefill_chunk=8, page_size=4)
        s = make(eng, prefix_cache=cache)
        try:
            results[cache] = [run_all(s, [r])[0] for r in reqs]  # one after the other: the first one caches
            assert_idle(s)
        finally:
            s.close()
        assert eng.violations == []
        starts = [c[2] for c in eng.calls if c[0] == "prefill"]
        if cache:
            # request 1: 0, 8, 16 (22 tokens in chunks of 8); 2 and 3: only from the cached 20 on
            assert starts == [0, 8, 16, 20, 20]
            assert [r[2].usage.cached_tokens for r in results[cache]] == [0, 20, 20]
            assert s.metrics.value("jaxinfer_prefix_cache_hit_tokens_total") == 40
            assert s.metrics.value("jaxinfer_prefix_cache_query_tokens_total") == 66
            assert s.blocks.stats().cached > 0  # finished sequences' pages stay cached
        else:
            assert starts == [0, 8, 16] * 3 and all(r[2].usage.cached_tokens == 0 for r in results[cache])
    assert [r[:2] for r in results[True]] == [r[:2] for r in results[False]]
    for r, (toks, lps, _) in zip(reqs, results[True]):
        assert toks == expected(r.prompt_ids, 6, eos=False)
        assert lps == [logprob_of(list(r.prompt_ids) + toks[:i]) for i in range(6)]


def test_match_never_covers_the_whole_prompt():
    eng = FakeEngine(max_seqs=1, page_size=4)
    s = make(eng)
    try:
        prompt = tuple(range(1, 9))  # exactly 2 pages
        for _ in range(2):
            assert collect(s.submit(Request(prompt, max_tokens=2)))[1] == expected(prompt, 2)
        starts = [c[2:5] for c in eng.calls if c[0] == "prefill"]
        assert starts == [(0, 8, True), (4, 4, True)]  # the second reuses one page, prefills the last
    finally:
        s.close()


def test_concurrent_requests_share_a_prefix_prefilled_once():
    system = tuple(range(1, 17))  # 4 pages
    eng = FakeEngine(max_seqs=4, max_len=64, prefill_chunk=16, page_size=4, step_delay=0.001)
    s = make(eng)
    try:
        first = s.submit(Request(system + (50,), max_tokens=20, ignore_eos=True))
        next(iter(first))  # its prompt is in the cache now; it keeps decoding beside the others
        rest = run_all(s, [Request(system + (60 + i,), max_tokens=4, return_logprobs=True) for i in range(3)])
        assert [r[2].usage.cached_tokens for r in rest] == [16, 16, 16]
        assert [r[0] for r in rest] == [expected(system + (60 + i,), 4) for i in range(3)]
        collect(first)
        assert_idle(s)
    finally:
        s.close()
    assert eng.violations == []


def test_requests_queued_together_prefill_a_shared_prefix_once():
    """Admission waits for the prefill budget, so of requests queued at the same moment only the
    first prefills the shared system prompt; the others match the pages it committed."""
    eng = GroupingFakeEngine(max_seqs=8, max_len=64, prefill_chunk=8, page_size=4)
    hold = eng.hold = threading.Event()
    s = make(eng, prefill_budget=8)
    try:
        blocker = s.submit(Request((9,), max_tokens=2))
        wait_for(lambda: eng.hold is None)  # the loop is inside the blocker's prefill
        system = tuple(range(1, 17))
        reqs = [Request(system + (40 + i, 41 + i), max_tokens=3) for i in range(4)]
        streams = [s.submit(r) for r in reqs]
        hold.set()
        results = [collect(st) for st in streams]
        collect(blocker)
        assert [r[1] for r in results] == [expected(r.prompt_ids, 3) for r in reqs]
        assert [r[3].usage.cached_tokens for r in results] == [0, 16, 16, 16]
        assert_idle(s)
    finally:
        s.close()
    assert eng.violations == []


def test_preemption_keeps_every_request_and_its_output():
    """A pool too small for the load: the newest sequences are preempted and recomputed, every
    stream ends as it does in a pool big enough, tokens and logprobs alike."""
    rng = random.Random(3)
    reqs = [
        Request(tuple(rng.randrange(0, 95) for _ in range(rng.randrange(3, 14))), max_tokens=rng.randrange(8, 30),
                return_logprobs=True, ignore_eos=i % 3 == 0, request_id=f"p{i}")
        for i in range(12)
    ]
    runs = {}
    for pages in (64, 12):  # 12 pages x 4 = 48 positions for 4 rows of up to 43
        eng = FakeEngine(max_seqs=4, max_len=64, prefill_chunk=8, page_size=4, num_pages=pages)
        s = make(eng, max_queue_requests=64)
        try:
            runs[pages] = run_all(s, reqs)
            assert_idle(s)
            preempted = s.metrics.value("jaxinfer_preemptions_total")
        finally:
            s.close()
        assert eng.violations == []
        assert (preempted > 0) == (pages == 12)
        # a recompute starts after the pages its first run left in the cache, past its prompt
        resumed = [c[2] for c in eng.calls if c[0] == "prefill" and c[6] and c[2] > 0]
        assert (pages == 64) or max(resumed) >= 16
    for a, b in zip(runs[64], runs[12]):
        assert (a[0], a[1], a[2].finish_reason, a[2].usage) == (b[0], b[1], b[2].finish_reason, b[2].usage)
    for r, (toks, _, last) in zip(reqs, runs[12]):
        assert toks == expected(r.prompt_ids, r.max_tokens, eos=not r.ignore_eos)


def test_preemption_under_multi_step_decode_and_prefix_cache_off():
    rng = random.Random(4)
    reqs = [Request(tuple(rng.randrange(0, 95) for _ in range(rng.randrange(2, 10))), max_tokens=rng.randrange(5, 25),
                    ignore_eos=True) for _ in range(10)]
    for cache in (True, False):
        eng = MultiStepFakeEngine(max_seqs=4, max_len=40, prefill_chunk=8, page_size=4, num_pages=10)
        s = make(eng, prefix_cache=cache, max_queue_requests=64)
        try:
            for r, (toks, _, last) in zip(reqs, run_all(s, reqs)):
                assert toks == expected(r.prompt_ids, r.max_tokens, eos=False) and last.finish_reason == "length"
            assert_idle(s)
            assert s.metrics.value("jaxinfer_preemptions_total") > 0
        finally:
            s.close()
        assert eng.violations == []


def test_request_that_can_never_fit_the_pool_is_refused_naming_the_limit():
    s = make(FakeEngine(max_seqs=2, max_len=64, page_size=4, num_pages=5))
    try:
        with pytest.raises(InvalidRequestError, match=r"= 21 exceeds the KV cache pool of 5 pages x 4 = 20 tokens") as e:
            s.submit(Request((1,) * 11, max_tokens=10))
        assert e.value.field == "max_tokens"
        with pytest.raises(InvalidRequestError, match="pool of 5 pages"):
            s.score((1,) * 15, (2,) * 6)
        assert collect(s.submit(Request((1,) * 10, max_tokens=10)))[3].finish_reason == "length"  # 20 fits
        assert_idle(s)
    finally:
        s.close()


def test_page_metrics():
    eng = FakeEngine(max_seqs=2, max_len=64, page_size=4, step_delay=0.002)
    s = make(eng)
    try:
        st = s.submit(Request(tuple(range(1, 10)), max_tokens=30, ignore_eos=True))
        it = iter(st)
        next(it)
        wait_for(lambda: s.metrics.value("jaxinfer_kv_pages", {"state": "used"}) >= 3)
        assert s.metrics.value("jaxinfer_active_seqs") == 1 and s.metrics.value("jaxinfer_max_seqs") == 2
        list(it)
        wait_for(lambda: s.metrics.value("jaxinfer_kv_pages", {"state": "used"}) == 0)
        cached = s.metrics.value("jaxinfer_kv_pages", {"state": "cached"})
        assert cached == (9 + 30 - 1) // 4  # every full page of known tokens stays cached
        assert cached + s.metrics.value("jaxinfer_kv_pages", {"state": "free"}) == eng.num_pages
        collect(s.submit(Request(tuple(range(1, 10)), max_tokens=2)))
        wait_for(lambda: s.metrics.value("jaxinfer_prefix_cache_hit_rate") > 0)
        assert s.metrics.value("jaxinfer_prefix_cache_hit_rate") == pytest.approx(8 / 18)
    finally:
        s.close()


def test_score_pairs_of_one_context_compute_it_once():
    eng = FakeEngine(max_seqs=2, max_len=64, prefill_chunk=8, page_size=4)
    s = make(eng)
    try:
        ctx = tuple(range(1, 21))  # 20 tokens
        pairs = [(ctx, (21, 22)), (ctx, (30,)), (ctx, (21, 22, 23, 40))]
        outs = s.score_batch(pairs)
        assert [o.token_logprobs for o in outs] == [(-1.0, -1.0), (-5.0,), (-1.0, -1.0, -1.0, -5.0)]
        assert [o.is_greedy for o in outs] == [True, False, False]
        assert outs[2].logprob == -8.0 and outs[0].continuation_ids == (21, 22)
        scores = [c[1:3] for c in eng.calls if c[0] == "score"]
        # the first pair runs the context from 0 in pieces of 8; the others from the cached 16 on
        assert scores == [(0, 8), (8, 8), (16, 5), (16, 4), (16, 7)]
        assert eng.score_reads[-1] == ctx + (21, 22, 23)
        assert s.score(ctx, (21,)).is_greedy
        assert_idle(s)
    finally:
        s.close()
    assert eng.violations == []


# -- soak --------------------------------------------------------------------------------------------


def test_soak_random_faults_leave_nothing_behind():
    eng = FakeEngine(max_seqs=4, max_len=96, prefill_chunk=5, step_delay=0.0005)
    s = make(eng, FakeTokenizer(poison=[77]), max_queue_requests=24, max_queue_tokens=400)
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        kind = rng.choice(["ok", "ok", "ok", "cancel", "deadline", "bad", "stop"])
        prompt = tuple(rng.randrange(0, 95) for _ in range(rng.randrange(1, 30)))
        if kind == "bad":
            prompt = prompt + (V + 3,)
        req = Request(
            prompt,
            max_tokens=rng.randrange(1, 40),
            stop=("m",) if kind == "stop" else (),
            deadline=time.monotonic() + rng.uniform(0.001, 0.02) if kind == "deadline" else None,
            request_id=f"soak{i}",
        )
        try:
            st = s.submit(req)
        except (InvalidRequestError, QueueFullError) as e:
            with lock:
                outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            return
        n = 0
        for ev in st:
            n += 1
            if kind == "cancel" and n == 2:
                st.cancel()
            if ev.finish_reason:
                with lock:
                    outcomes[ev.finish_reason] = outcomes.get(ev.finish_reason, 0) + 1

    threads = []
    for i in range(300):
        t = threading.Thread(target=client, args=(i,))
        t.start()
        threads.append(t)
        if i % 8 == 0:
            time.sleep(0.002)
    for t in threads:
        t.join(30)
    assert sum(outcomes.values()) == 300
    assert outcomes.get("InvalidRequestError", 0) > 0 and outcomes.get("length", 0) > 0
    assert_idle(s)
    by_reason = s.metrics.finished_by_reason()
    for reason in ("stop", "length", "cancelled", "deadline", "error"):
        assert by_reason[reason] == outcomes.get(reason, 0)
    assert eng.violations == []
    s.close()


# -- the real engine ---------------------------------------------------------------------------------


def tiny_real_engine(max_seqs: int, num_pages: int, page_size: int = 8, **kw):
    """A tiny random Llama on the real Engine with a pool of ``num_pages`` pages."""
    import dataclasses

    import jax.numpy as jnp

    from jaxinfer.config import SMOLLM2_135M
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import Engine
    from jaxinfer.engine.pages import KVPool
    from jaxinfer.model.transformer import Transformer
    from jaxinfer.model.weights import nest, random_weights

    cfg = dataclasses.replace(
        SMOLLM2_135M, name="llama-tiny", num_layers=2, hidden_size=72, intermediate_size=96, vocab_size=512,
        head_dim=8, max_position_embeddings=512,
    )
    model = Transformer(cfg, params=nest({k: jnp.asarray(v) for k, v in random_weights(cfg, seed=0, scale=0.15).items()}))
    pool = num_pages * page_size * KVPool.bytes_per_token(cfg, jnp.float32)
    return Engine(model, EngineConfig(max_seqs=max_seqs, max_len=128, page_size=page_size, kv_cache_bytes=pool,
                                      prefill_buckets=(16, 32), lazy_compile=True, **kw))


class RealTok:
    vocab_size, eos_ids = 512, (2,)

    def decode(self, ids, skip_special=True):
        return "".join(chr(0x4E00 + i) for i in ids)


def direct_greedy(eng, prompt: Sequence[int], max_tokens: int, sampling: SamplingParams = SamplingParams()) -> list[int]:
    """Drive the engine by hand, one sequence on row 0 over pages 0, 1, ..."""
    pages = list(range(-(-(len(prompt) + max_tokens) // eng.page_size)))
    first, chunk = None, eng.prefill_chunk
    for off in range(0, len(prompt), chunk):
        first = eng.prefill(0, prompt[off : off + chunk], sampling, pages=pages, start=off,
                            last=off + chunk >= len(prompt))
    out = [first.token]
    while len(out) < max_tokens:
        out.append(eng.decode([0], {0: pages}).result()[0].token)
    eng.release(0)
    return out


@pytest.mark.slow
def test_real_engine_streams_equal_direct_engine_calls():
    """The scheduler over the real Engine (tiny random Llama): pipelined decode, chunked prompts,
    row reuse and prefix-cache hits give the tokens of driving the engine by hand, one request at
    a time; sampled requests with a seed too."""
    eng = tiny_real_engine(max_seqs=3, num_pages=64)
    rng = random.Random(5)
    shared = tuple(rng.randrange(3, 512) for _ in range(40))  # 5 pages: later requests hit them
    reqs = [
        Request(
            (shared if i % 2 else ()) + tuple(rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))),
            max_tokens=rng.randrange(1, 40),
            sampling=SamplingParams(temperature=0.0 if i % 3 else 0.8, seed=i, logprobs=2), return_logprobs=True,
            ignore_eos=True,
        )
        for i in range(10)
    ]
    s = Scheduler(eng, RealTok(), metrics=Metrics(), detokenizer=FakeDetokenizer).start()
    try:
        batched = [collect(st) for st in [s.submit(r) for r in reqs]]
        assert s.load().live_requests == 0 and s.blocks.stats().used == 0
        assert sum(e[3].usage.cached_tokens for e in batched) > 0
    finally:
        s.close()
    for r, (_, out, _, last) in zip(reqs, batched):
        assert out == direct_greedy(eng, r.prompt_ids, r.max_tokens, r.sampling) and last.finish_reason == "length"


@pytest.mark.slow
def test_real_engine_preemption_keeps_greedy_outputs():
    """A pool too small for the load: preempted sequences are recomputed (through the prefix
    cache) and every greedy stream equals the engine driven by hand."""
    eng = tiny_real_engine(max_seqs=4, num_pages=12)  # 96 positions for 4 rows of up to ~70
    rng = random.Random(9)
    reqs = [Request(tuple(rng.randrange(3, 512) for _ in range(rng.randrange(8, 30))), max_tokens=rng.randrange(20, 40),
                    ignore_eos=True) for _ in range(8)]
    s = Scheduler(eng, RealTok(), metrics=Metrics(), detokenizer=FakeDetokenizer).start()
    try:
        batched = [collect(st) for st in [s.submit(r) for r in reqs]]
        assert s.metrics.value("jaxinfer_preemptions_total") > 0
        assert s.blocks.stats().used == 0
    finally:
        s.close()
    for r, (_, out, _, last) in zip(reqs, batched):
        assert last.finish_reason == "length" and out == direct_greedy(eng, r.prompt_ids, r.max_tokens)
