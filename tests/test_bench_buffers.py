"""The buffer-cost benchmark: its fit recovers a known slope, and on the real
runtime a call that donates more buffers costs the host more."""

from __future__ import annotations

import pytest

from scripts.experiments import bench_buffers


def test_fit_recovers_cost_per_buffer_and_per_call():
    ns = [1, 16, 64, 256]
    slope, icpt = bench_buffers.fit(ns, [3.0 + 1.5 * n for n in ns])
    assert slope == pytest.approx(1.5) and icpt == pytest.approx(3.0)


def test_measure_runs_and_donated_buffers_cost_the_host(capsys):
    res = bench_buffers.measure([1, 128], elements=256, calls=10, repeat=2)
    assert [r["buffers"] for r in res["rows"]] == [1, 128]
    one, many = res["rows"]
    # the runtime pays per donated buffer, so 128 of them cost the host clearly more than one
    assert many["donated_host_us"] > one["donated_host_us"] + 20
    assert res["donated_host_us_per_buffer"] > 0
    assert bench_buffers.main(["--counts", "1,8", "--calls", "3", "--repeat", "1"]) == 0
    assert "us per buffer" in capsys.readouterr().out
