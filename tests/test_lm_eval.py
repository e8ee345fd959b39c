"""lm-evaluation-harness backend: lm-eval's own ``simple_evaluate`` on the local tasks under
tests/data/lm_eval (multiple choice, rolling log-likelihood, generate_until), in process and against a
server; ``loglikelihood`` equals ``jaxinfer score``; lm-eval's command line through
``python -m jaxinfer.lm_eval_backend``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import jaxinfer.lm_eval_backend as backend_mod  # noqa: E402  (registers "jaxinfer")
from jaxinfer.cli import main  # noqa: E402
from jaxinfer.evaluation.backend import EngineBackend, GenerationOptions, Prompt  # noqa: E402
from jaxinfer.evaluation.choice import evaluate_choice, read_items, summarize  # noqa: E402
from jaxinfer.evaluation.perplexity import evaluate_perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TASKS = ["jaxinfer_tiny_choice", "jaxinfer_tiny_rolling", "jaxinfer_tiny_gen"]


def simple_evaluate(model, tasks, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(DATA / "lm_eval")),
                                   log_samples=True, **kw)


def jaxinfer_score(capsys, model: str, pairs, *extra: str) -> list[dict]:
    """``jaxinfer score`` (the CLI, in this process) on (context, continuation) pairs."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in pairs))
    capsys.readouterr()
    assert main(["score", f.name, "--model", model, *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def choice_samples(res) -> tuple[list[tuple[str, str]], list[float], list[bool]]:
    pairs, lps, greedy = [], [], []
    for s in sorted(res["samples"]["jaxinfer_tiny_choice"], key=lambda s: s["doc_id"]):
        for args, resp in zip(s["arguments"], s["resps"]):
            pairs.append((args[0], args[1]))
            lps.append(resp[0][0])
            greedy.append(resp[0][1])
    return pairs, lps, greedy


def test_registered_and_mesh_syntax():
    from lm_eval.api.registry import get_model

    assert get_model("jaxinfer") is backend_mod.JaxinferLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay registered
    assert backend_mod.parse_mesh("2x4") == "data=2,model=4"
    assert backend_mod.parse_mesh("data:1;model:2") == "data=1,model=2"
    assert backend_mod.parse_mesh(None) is None


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository


@pytest.mark.slow  # lm-eval runs three tasks
def test_simple_evaluate_in_process_equals_jaxinfer(tiny_ckpt, tiny_engine, in_repo, capsys):
    res = simple_evaluate("jaxinfer", TASKS, model_args=f"model={tiny_ckpt},max_seqs=4,max_len=128,kv_cache_memory=1MiB,window=64,stride=32")
    # loglikelihood == `jaxinfer score`, pair by pair
    pairs, lps, greedy = choice_samples(res)
    assert len(pairs) == 39
    scored = jaxinfer_score(capsys, str(tiny_ckpt), pairs, "--max-len", "128")
    np.testing.assert_allclose(lps, [s["logprob"] for s in scored], atol=1e-4)
    assert greedy == [s["is_greedy"] for s in scored]
    # multiple-choice accuracy == `jaxinfer eval choice` on the same file
    ours = summarize(evaluate_choice(EngineBackend(tiny_engine), read_items(DATA / "choice.jsonl")))
    r = res["results"]["jaxinfer_tiny_choice"]
    assert r["acc,none"] == pytest.approx(ours["acc"]) and r["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # rolling log-likelihood == minus the NLL of our perplexity with the same windows
    docs = [json.loads(line)["text"] for line in (DATA / "rolling.jsonl").read_text().splitlines()]
    want = evaluate_perplexity(EngineBackend(tiny_engine), [(str(i), d) for i, d in enumerate(docs)], window=64,
                               stride=32)
    got = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["jaxinfer_tiny_rolling"]}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], [-d.nll for d in want], rtol=1e-5)
    # generate_until == our generation with the same stop strings
    gen = sorted(res["samples"]["jaxinfer_tiny_gen"], key=lambda s: s["doc_id"])
    ours = EngineBackend(tiny_engine).generate([Prompt(text=c) for c, _ in (s["arguments"][0] for s in gen)],
                                               [GenerationOptions(max_tokens=12, stop=("\n", "."))] * len(gen))
    assert [s["resps"][0][0] for s in gen] == [g.text for g in ours]
    assert all("\n" not in g.text and "." not in g.text for g in ours)


@pytest.mark.slow
def test_against_a_server_equals_in_process(tiny_engine, in_repo):
    from jaxinfer.metrics import Metrics
    from server.app import ModelDescription, ServerOptions, build_server

    local = simple_evaluate(backend_mod.JaxinferLM(backend=EngineBackend(tiny_engine)), TASKS[:1])
    srv = build_server(tiny_engine, tiny_engine.tokenizer, ModelDescription("tiny-bpe"), ServerOptions(),
                       metrics=Metrics()).start()
    try:
        remote = simple_evaluate("jaxinfer", TASKS[:1], model_args=f"server=127.0.0.1:{srv.port},concurrency=4")
    finally:
        srv.stop()
    _, lp_local, g_local = choice_samples(local)
    _, lp_remote, g_remote = choice_samples(remote)
    np.testing.assert_allclose(lp_remote, lp_local, atol=1e-4)
    assert g_remote == g_local
    assert remote["results"]["jaxinfer_tiny_choice"]["acc,none"] == local["results"]["jaxinfer_tiny_choice"]["acc,none"]


@pytest.mark.slow  # a fresh process imports lm-eval and compiles
def test_lm_eval_command_line(tiny_ckpt, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxinfer.lm_eval_backend", "--model", "jaxinfer", "--model_args",
         f"model={tiny_ckpt},max_seqs=2,max_len=128,kv_cache_memory=1MiB", "--tasks", "jaxinfer_tiny_choice", "--include_path",
         "tests/data/lm_eval", "--limit", "3", "--output_path", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jaxinfer_tiny_choice" in proc.stdout and "acc" in proc.stdout
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(result.read_text())["results"]["jaxinfer_tiny_choice"]


@pytest.mark.real
def test_smollm2_loglikelihood_equals_jaxinfer_score(smollm2_dir, in_repo, capsys):
    res = simple_evaluate("jaxinfer", TASKS[:1], model_args=f"model={smollm2_dir},max_seqs=4,max_len=256,kv_cache_memory=32MiB", limit=4)
    pairs, lps, greedy = choice_samples(res)
    scored = jaxinfer_score(capsys, str(smollm2_dir), pairs, "--max-len", "256")
    np.testing.assert_allclose(lps, [s["logprob"] for s in scored], atol=2e-4)
    assert greedy == [s["is_greedy"] for s in scored]
    assert [s["continuation_ids"] for s in scored][0]  # a real tokenization
