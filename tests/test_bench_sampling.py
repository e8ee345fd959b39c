"""The sampling benchmark runs both samplers and leaves the engine's in place."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from jaxinfer.engine import sampling

_spec = importlib.util.spec_from_file_location(
    "bench_sampling", Path(__file__).resolve().parent.parent / "scripts" / "bench_sampling.py")
bench_sampling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_sampling)


def test_zipf_logits_are_shuffled_power_law_rows():
    x = bench_sampling.zipf_logits(2, 1000)
    assert x.shape == (2, 1000) and not np.array_equal(x[0], x[1])
    np.testing.assert_allclose(np.sort(x[0])[::-1], -1.5 * np.log(np.arange(1, 1001)), rtol=1e-6)


def test_bench_sampling_times_both_draws_and_restores_the_engines(capsys, tmp_path):
    out = tmp_path / "s.json"
    assert bench_sampling.main(["--batches", "2", "--vocabs", "8192", "--repeat", "1", "--json", str(out)]) == 0
    assert sampling._DRAW is sampling.draw_filtered
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 2 | 8192 |")]
    assert len(table) == len(bench_sampling.CASES)
    import json

    rows = json.loads(out.read_text())
    assert all(r["engine_ms"] > 0 and r["bisection_ms"] > 0 for r in rows)
