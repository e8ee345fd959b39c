"""Perplexity of the real models under every quantized mode against float32 (issue 18's bounds),
measured by scripts/quant_quality.py on tests/data/ppl.txt.

Three bounds are missed for measured reasons (docs/quantization.md) and are strict xfails: they
fail the suite the day they start to pass, so the bound and the docs get updated. A second
check holds each missed mode to what it measures today, so it cannot quietly get worse."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import quant_quality

pytestmark = [pytest.mark.real, pytest.mark.slow]

TEXT = (Path(__file__).parent / "data" / "ppl.txt").read_text()
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
MODES = ["int8-weight-only", "int8-w8a8", "int4", "kv-int8"]
# (model, mode) -> (why the bound is missed, the ratio - 1 measured today, with a margin)
MISSED = {
    ("smollm2", "int8-weight-only"): ("per-channel scales on the value projection: +0.7 of the 1.2 points", 0.015),
    ("smollm2", "int8-w8a8"): ("per-token activation scales; SmolLM2's normed residual stream has outlier channels",
                               0.075),
    ("gemma3", "int4"): ("most of the GGUF's projections are 5-bit (Q5_0): 4 bits lose what the source kept", 0.13),
}


@pytest.fixture(scope="module")
def measure(smollm2_dir, gemma3_dir):
    """measure(model) -> quant_quality's results for it, computed once."""
    dirs, done = {"smollm2": smollm2_dir, "gemma3": gemma3_dir}, {}

    def get(model: str) -> dict:
        if model not in done:
            done[model] = quant_quality.measure(str(dirs[model]), MODES, TEXT)
        return done[model]
    return get


def _cases():
    for model in sorted(MODELS):
        for mode in MODES:
            why = MISSED.get((model, mode))
            marks = [pytest.mark.xfail(strict=True, reason=why[0])] if why else []
            yield pytest.param(model, mode, marks=marks, id=f"{model}-{mode}")


@pytest.mark.parametrize("model,mode", list(_cases()))
def test_perplexity_within_the_bound(measure, model, mode):
    ratio = measure(model)[mode]["ratio"]
    assert abs(ratio - 1) <= quant_quality.BOUNDS[mode], f"{model} {mode}: {100 * (ratio - 1):+.2f}%"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_missed_bounds_do_not_get_worse_and_bytes_shrink(measure, model):
    res = measure(model)
    for (name, mode), (_, today) in MISSED.items():
        if name == model:
            assert res[mode]["ratio"] - 1 <= today, f"{model} {mode}: {100 * (res[mode]['ratio'] - 1):+.2f}%"
    f32 = res["float32"]["weight_bytes"]
    assert res["int8-weight-only"]["weight_bytes"] <= 0.30 * f32
    assert res["int4"]["weight_bytes"] < res["int8-w8a8"]["weight_bytes"]
    assert res["kv-int8"]["kv_bytes_per_token"] * 3 < res["float32"]["kv_bytes_per_token"]
