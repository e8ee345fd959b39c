"""The engine benchmark's timing helpers drive the engine the way the scheduler
does (prefill in chunks through page tables, decode every row) and time real work."""

from __future__ import annotations

import math

from jaxinfer.engine.engine import Engine
from scripts import bench_engine
from tests.helpers.tiny import LLAMA_TINY, engine_config, make_model


def test_bench_helpers_time_prefill_and_decode():
    eng = Engine(make_model(LLAMA_TINY), engine_config(LLAMA_TINY, lazy_compile=True))
    t = bench_engine.bench_prefill(eng, 40, repeat=1)  # two chunks of at most 32
    assert math.isfinite(t) and 0 < t < 30
    t = bench_engine.bench_decode(eng, 3, 20, steps=2, repeat=1)
    assert math.isfinite(t) and 0 < t < 30
    assert eng.last_decode_program[:2] == ("decode", 4)  # three rows pad to the 4-row program
    assert all(eng.row_length(r) == 0 for r in range(3))  # released
