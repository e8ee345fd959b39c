"""scripts/bench_prefix.py's accounting over the hand-computable fake engine (tests.helpers.fakes)."""

from __future__ import annotations

from jaxinfer.scheduler import Request
from scripts import bench_prefix
from tests.helpers.fakes import V, FakeEngine, expected


def test_shared_prefix_run_counts_cached_tokens_and_ttft():
    system = tuple(range(1, 33))
    reqs = [Request(system + (40 + i,), 4, ignore_eos=True) for i in range(6)]
    out = {}
    for cache in (False, True):
        out[cache] = bench_prefix.run_requests(FakeEngine(max_seqs=4, max_len=64, prefill_chunk=8, step_delay=0.001),
                                               reqs, prefix_cache=cache, vocab_size=V)
    assert out[False]["cached_prompt_tokens"] == 0 and out[True]["cached_prompt_tokens"] == 5 * 32
    assert out[True]["outputs"] == out[False]["outputs"] == [expected(r.prompt_ids, 4, eos=False) for r in reqs]
    for r in out.values():
        assert r["finished"] == {"length": 6} and r["rejected"] == 0 and r["ttft_p50_s"] <= r["ttft_p95_s"]
        assert 1 <= r["peak_active_seqs"] <= 4


def test_small_pool_preempts_and_keeps_outputs():
    reqs = [Request(tuple(range(i, i + 10)), 20, ignore_eos=True) for i in range(8)]
    big = bench_prefix.run_requests(FakeEngine(max_seqs=4, max_len=64), reqs, prefix_cache=True, vocab_size=V)
    small = bench_prefix.run_requests(FakeEngine(max_seqs=4, max_len=64, num_pages=10), reqs, prefix_cache=True,
                                      vocab_size=V)
    assert big["preemptions"] == 0 and small["preemptions"] > 0
    assert small["outputs"] == big["outputs"] and small["finished"] == {"length": 8}
    assert small["peak_pages_used"] <= 10
