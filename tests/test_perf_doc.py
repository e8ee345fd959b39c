"""docs/performance.md is generated: scripts/perf_doc.py turns each benchmark's JSON into tables
and plots, refuses JSON it does not know, and the checked-in document is what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import perf_doc

ROOT = Path(__file__).resolve().parents[1]

ENGINE = {
    "machine": {"backend": "cpu", "cpus": 2, "jax": "0.10.0"}, "model": "tiny", "dtype": "float32",
    "bandwidth_gbs": 50.0, "matmul_gflops": 500.0, "param_bytes": 2 * 2**20,
    "prefill": [{"tokens": 128, "jaxinfer_s": 0.09, "jaxinfer_tok_s": 1422.2, "transformers_s": 0.18, "speedup": 2.0,
                 "tflops": 0.25}],
    "decode": [{"batch": b, "context": 128, "step_ms": ms, "tok_s": b / ms * 1e3, "bytes_per_step": 1, "flops_per_step": 1,
                "roofline_tok_s": 100.0 * b, "roofline_frac": 0.5, "mbu": 0.4, "matmul_floor_ms": ms / 2}
               for b, ms in ((1, 13.25), (8, 28.5))],
    "grouped_prefill": {"prompts": 4, "tokens": 32, "separate_s": 0.149, "grouped_s": 0.1, "speedup": 1.49},
    "multi_step": [], "finer_spans": [], "targets": {"batch8_over_batch1": 3.72},
}
PCT = {"mean": 1.0, "p50": 111.5, "p90": 1.0, "p95": 1.0, "p99": 120.25, "n": 4}
SERVE = {
    "server": "127.0.0.1:1", "created": "2026-12-01T00:00:00+0000",
    "model": {"name": "tiny", "dtype": "float32", "mesh": "1 device", "slots": 4, "max_len": 64},
    "settings": {"num_requests": 4, "input_len": 8, "output_len": 4},
    "runs": [{"label": f"c={c}", "completed": 4, "failed": 0, "request_throughput": 0.5, "output_tokens_per_s": 35.5 * c,
              "ttft_ms": PCT, "tpot_ms": PCT, "itl_ms": PCT, "e2e_ms": PCT, "goodput": 0.5} for c in (1, 4)],
}
EVAL = {
    "model": "tiny", "checkpoint": "x", "window": 64, "stride": 32, "chars": 1000, "slots": 4, "max_len": 128,
    "perplexity": {"tokens": 300, "windows": 5, "jaxinfer_s": 1.5, "transformers_s_by_threads": {"2": 3.0},
                   "jaxinfer_ppl": 12.345, "transformers_ppl": 12.346},
    "choice": {"pairs": 20, "tokens": 400, "jaxinfer_s": 2.0, "transformers_s_by_threads": {"2": 4.0},
               "max_abs_logprob_diff": 3e-4},
}
MULTIHOST = {"args": {"devices": 4, "model": None}, "load_average": [1.0, 1.0, 1.0],
             "results": {"single": {"step_ms_p50": 2.5, "step_ms_p90": 3.0, "pipelined_step_ms": 2.0, "prefill_ms": 9.0,
                                    "tokens_per_s": 800.0}}}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for name, doc in (("engine", ENGINE), ("serve", SERVE), ("eval", EVAL), ("multihost", MULTIHOST)):
        (d / f"{name}.json").write_text(json.dumps(doc))
    (d / "earlier.md").write_text("hand-copied figure: 42 tok/s")
    (d / "serve.note.md").write_text("Measured on a busy machine.")
    return d


def test_every_kind_becomes_its_tables_and_plots(data: Path, tmp_path: Path):
    out = tmp_path / "docs" / "performance.md"
    out.parent.mkdir()
    assert perf_doc.main(["--data", str(data), "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## Engine", "## Serving", "## Evaluation", "## Multi-host", "## Earlier measurements"):
        assert heading in text
    assert text.index("## Engine") < text.index("## Earlier measurements")
    assert "| 128" in text and "| 90.0" in text and "| 180.0" in text  # prefill row: ms from seconds
    assert "| 1            | 128     | 13.25" in text and "| 6.62" in text  # decode row and its matmul floor
    assert "4 prompts x 32 tokens: 149.0 ms in 4 calls, 100.0 ms in one call (1.49x)" in text
    assert "| c=4  |" in text and "| 142" in text  # the serving sweep's table
    assert "| 12.345" in text and "| 200.0" in text  # perplexity and choice tokens/s
    assert "| single | 2.50" in text
    assert "hand-copied figure: 42 tok/s" in text
    assert text.index("Measured on a busy machine.") > text.index("### serve") > text.index("### engine")
    for stem in ("engine", "serve"):
        png = out.parent / f"perf_{stem}.png"
        assert f"](perf_{stem}.png)" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_json_is_refused_by_name(data: Path, tmp_path: Path):
    (data / "mystery.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="mystery.json: not the JSON of a known benchmark"):
        perf_doc.main(["--data", str(data), "--out", str(tmp_path / "p.md"), "--no-plots"])


def test_checked_in_document_is_what_the_script_writes(tmp_path: Path):
    out = tmp_path / "performance.md"
    perf_doc.main(["--data", str(ROOT / "docs" / "data"), "--out", str(out), "--no-plots"])
    assert out.read_text() == (ROOT / "docs" / "performance.md").read_text(), \
        "docs/performance.md is stale or edited by hand: run python scripts/perf_doc.py"
    for png in ("perf_" + f.stem + ".png" for f in (ROOT / "docs" / "data").glob("*.json")):
        if f"]({png})" in out.read_text():
            assert (ROOT / "docs" / png).exists(), png
