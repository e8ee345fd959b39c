"""The serving benchmark against an in-process gRPC server over the hand-computable fake engine
(tests.helpers.fakes): request accounting, latency statistics, goodput, arrivals, sweep JSON and PNG."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest

from jaxinfer.cli import main
from jaxinfer.client import InferenceClient
from jaxinfer.evaluation.serving import (
    SLO,
    RequestRecord,
    arrival_offsets,
    dataset_requests,
    latency_stats,
    run_load,
    send,
    synthetic_requests,
)
from tests.helpers.fakes import EOS, FakeEngine
from tests.helpers.served import Served


@pytest.fixture
def served():
    s = Served(FakeEngine(max_seqs=4, max_len=128, prefill_chunk=8, step_delay=0.003))
    yield s
    s.close()


def test_arrivals_have_the_asked_rate_and_burstiness():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    for burst in (0.5, 1.0, 4.0):
        t = np.array(arrival_offsets(4001, rate=20.0, burstiness=burst, seed=1))
        gaps = np.diff(t)
        assert t[0] == 0.0 and np.all(gaps >= 0)
        assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.08)
        # gamma(shape k): squared coefficient of variation 1/k (1 for a Poisson process)
        assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / burst, rel=0.15)
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=0.0)


def test_synthetic_requests_lengths_and_excluded_ids():
    reqs = synthetic_requests(200, 20, 10, vocab_size=97, range_ratio=0.5, exclude_ids=[EOS, 0], seed=3)
    ins = [len(r.prompt_ids) for r in reqs]
    outs = [r.max_tokens for r in reqs]
    assert min(ins) >= 10 and max(ins) <= 30 and len(set(ins)) > 5
    assert min(outs) >= 5 and max(outs) <= 15
    ids = {t for r in reqs for t in r.prompt_ids}
    assert EOS not in ids and 0 not in ids and max(ids) < 97 and 95 in ids
    assert reqs == synthetic_requests(200, 20, 10, vocab_size=97, range_ratio=0.5, exclude_ids=[EOS, 0], seed=3)
    fixed = synthetic_requests(10, 7, 3, vocab_size=97)
    assert all(len(r.prompt_ids) == 7 and r.max_tokens == 3 for r in fixed)


def test_latency_stats_and_slo():
    s = latency_stats([0.001 * i for i in range(1, 101)] + [math.nan])
    assert s["n"] == 100 and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert s["p50"] <= s["p90"] <= s["p95"] <= s["p99"]
    r = RequestRecord(ok=True, output_tokens=11, ttft=0.1, e2e=1.1)
    assert r.tpot == pytest.approx(0.1)
    assert SLO(ttft_ms=100.0, tpot_ms=100.0, e2e_ms=1100.0).met(r)
    assert not SLO(ttft_ms=99.0).met(r) and not SLO(tpot_ms=99.0).met(r) and not SLO(e2e_ms=1000.0).met(r)
    assert SLO(tpot_ms=1.0).met(RequestRecord(ok=True, output_tokens=1, ttft=0.1, e2e=0.1))  # no TPOT to check
    assert not SLO().met(RequestRecord(ok=False))


def test_fixed_concurrency_counts_every_token(served):
    client = InferenceClient(f"127.0.0.1:{served.server.port}")
    try:
        reqs = synthetic_requests(12, 10, 6, vocab_size=97, range_ratio=0.5, exclude_ids=[EOS], seed=0)
        run = run_load(partial(send, client), reqs, concurrency=4, label="c=4")
    finally:
        client.close()
    m = run.metrics(SLO(ttft_ms=60_000))
    assert (m["completed"], m["failed"]) == (12, 0)
    assert m["output_tokens"] == sum(r.max_tokens for r in reqs)  # ignore_eos: exactly max_tokens each
    assert m["input_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    for rec, req in zip(run.records, reqs):
        assert rec.output_tokens == req.max_tokens and 0 < rec.ttft <= rec.e2e
        assert len(rec.itl) <= req.max_tokens - 1
    assert m["request_throughput"] == pytest.approx(12 / run.duration_s)
    assert m["goodput"] == pytest.approx(m["request_throughput"]) and m["slo_attainment"] == 1.0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        st = m[key]
        assert st["p50"] <= st["p90"] <= st["p95"] <= st["p99"]
    assert run.metrics(SLO(ttft_ms=1e-6))["goodput"] == 0.0
    served.idle()


def test_rate_mode_and_failures_are_reported(served):
    client = InferenceClient(f"127.0.0.1:{served.server.port}")
    try:
        reqs = synthetic_requests(10, 6, 4, vocab_size=97, exclude_ids=[EOS], seed=1)
        reqs.append(synthetic_requests(1, 200, 4, vocab_size=97, exclude_ids=[EOS])[0])  # > max_len 128: refused
        run = run_load(partial(send, client), reqs, rate=200.0, burstiness=1.0, concurrency=2, seed=2, label="rate=200")
    finally:
        client.close()
    m = run.metrics()
    assert (m["completed"], m["failed"]) == (10, 1)
    assert any("INVALID_ARGUMENT" in e for e in m["errors"])
    assert run.duration_s >= arrival_offsets(11, 200.0, 1.0, seed=2)[-1]
    assert "goodput" not in m  # no SLO given
    served.idle()


def test_sweep_cli_writes_json_and_png(served, tmp_path):
    out, png, data = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "prompts.jsonl"
    addr = f"127.0.0.1:{served.server.port}"
    rc = main(["bench", "serve", "--server", addr, "--concurrency", "1,4", "--num-requests", "12", "--input-len", "8",
               "--output-len", "8", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "5000", "-o", str(out), "--plot",
               str(png), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["name"] == "fake-97" and [r["label"] for r in doc["runs"]] == ["c=1", "c=4"]
    c1, c4 = doc["runs"]
    for r in doc["runs"]:
        assert (r["completed"], r["failed"], r["output_tokens"]) == (12, 0, 96)
        assert r["goodput"] <= r["request_throughput"] + 1e-9
    # four requests share each decode step (3 ms): clearly more throughput than one at a time
    assert c4["output_tokens_per_s"] > 1.5 * c1["output_tokens_per_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    # prompts from a JSONL file (text and token ids), at a request rate
    data.write_text('{"prompt": "hello", "output_len": 3}\n{"prompt_token_ids": [5, 6, 7], "max_tokens": 2}\n')
    reqs = dataset_requests(data, None, 9)
    assert [(r.prompt, r.prompt_ids, r.max_tokens) for r in reqs] == [("hello", (), 3), ("", (5, 6, 7), 2)]
    assert len(dataset_requests(data, 5, 9)) == 5
    rc = main(["bench", "serve", "--server", addr, "--request-rate", "100", "--dataset", str(data), "--num-requests",
               "4", "--warmup", "0", "-o", str(out), "--no-progress"])
    assert rc == 0
    (r,) = json.loads(out.read_text())["runs"]
    assert r["completed"] == 4 and r["request_rate"] == 100.0
    served.idle()
