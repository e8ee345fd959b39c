"""The HTTP API with the real SmolLM2 (float32, CPU): lm-evaluation-harness's own
``local-completions`` model (``tokenizer_backend=remote``: /tokenize, /detokenize,
/tokenizer_info, no model hub) against the server gives the in-process backend's
log-likelihoods, accuracies and generations on the local tasks; one streamed chat and one
echo-logprobs call against the engine's own numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openai
import pytest

lm_eval = pytest.importorskip("lm_eval")

import jaxinfer.lm_eval_backend as backend_mod  # noqa: E402  (registers "jaxinfer")
from jaxinfer.api import LLM  # noqa: E402
from jaxinfer.engine.engine import Engine, EngineConfig  # noqa: E402
from jaxinfer.evaluation.backend import EngineBackend, GenerationOptions, Prompt  # noqa: E402
from jaxinfer.loading import build_engine  # noqa: E402
from jaxinfer.metrics import Metrics  # noqa: E402
from server.app import ModelDescription, ServerOptions, build_server  # noqa: E402
from server.openai_api.server import HttpOptions  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["jaxinfer_tiny_choice", "jaxinfer_tiny_gen"]
NAME = "smollm2"


@pytest.fixture(scope="module")
def engine(smollm2_dir) -> Engine:
    return build_engine(smollm2_dir, EngineConfig(max_seqs=4, max_len=256, prefill_buckets=(32, 128),
                                                  kv_cache_bytes=1 << 25, lazy_compile=True))


class Serving:
    """The engine behind gRPC + HTTP; the engine is used by nothing else while this is open."""

    def __init__(self, engine: Engine) -> None:
        self.server = build_server(engine, engine.tokenizer, ModelDescription(NAME), ServerOptions(),
                                   metrics=Metrics(), http=HttpOptions(port=0)).start()
        self.url = self.server.http.url

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()


def evaluate(model, model_args=None):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=TASKS, model_args=model_args, log_samples=True,
                                   task_manager=TaskManager(include_path=str(ROOT / "tests" / "data" / "lm_eval")))


def samples(res, task):
    return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_local_completions_equals_in_process(engine, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository
    local = evaluate(backend_mod.JaxinferLM(backend=EngineBackend(engine)))
    with Serving(engine) as s:
        remote = evaluate("local-completions", f"model={NAME},base_url={s.url}/v1/completions,"
                                               "tokenizer_backend=remote,num_concurrent=4,max_length=256")
    ll_local = [r[0] for x in samples(local, TASKS[0]) for r in x["resps"]]
    ll_remote = [r[0] for x in samples(remote, TASKS[0]) for r in x["resps"]]
    assert len(ll_local) == len(ll_remote) == 39
    np.testing.assert_allclose([v[0] for v in ll_remote], [v[0] for v in ll_local], atol=1e-4)
    assert [v[1] for v in ll_remote] == [v[1] for v in ll_local]  # is_greedy, from top_logprobs
    for metric in ("acc,none", "acc_norm,none"):
        assert remote["results"][TASKS[0]][metric] == local["results"][TASKS[0]][metric]
    gen_local = [x["resps"][0][0] for x in samples(local, TASKS[1])]
    gen_remote = [x["resps"][0][0] for x in samples(remote, TASKS[1])]
    assert gen_remote == gen_local and any(g.strip() for g in gen_local)
    assert remote["results"][TASKS[1]]["exact_match,none"] == local["results"][TASKS[1]]["exact_match,none"]


def test_streamed_chat_and_echo_logprobs(engine):
    messages = (("user", "What is the capital of France?"),)
    (want,) = EngineBackend(engine).generate([Prompt(messages=messages)], [GenerationOptions(max_tokens=12)])
    ids = engine.tokenizer.encode("The capital of France is Paris")
    with LLM(engine) as llm:
        (score,) = llm.score([(ids[:1], ids[1:])])
    with Serving(engine) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        chunks = list(client.chat.completions.create(
            model=NAME, messages=[{"role": r, "content": c} for r, c in messages], max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        echo = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text and "Paris" in text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], score.token_logprobs, atol=1e-5)
    tops = [max(t.values()) for t in lp.top_logprobs[1 : len(ids)]]
    np.testing.assert_allclose(tops, score.top_logprobs, atol=1e-5)
    assert lp.tokens[: len(ids)] == [engine.tokenizer.decode([t], skip_special=False) for t in ids]
    assert " Paris" in lp.tokens
