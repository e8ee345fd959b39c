"""The OpenAI-compatible HTTP API with the official ``openai`` client (and httpx for what it cannot
send), against an in-process server: uvicorn on a loopback port beside gRPC, one scheduler, the
hand-computable fake engine of conftest (greedy: next token = last + 1, log-prob -0.25; the
fake vocabulary is printable ASCII, id = ord(c) - 32, BOS = 95, EOS = 96)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading

import grpc
import httpx
import openai
import pytest

from jaxinfer.scheduler import Request
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ModelDescription, ServerOptions, build_server
from server.openai_api.server import HttpOptions
from tests.helpers import wait_for
from tests.helpers.http_served import MODEL, Served



def ids(text: str) -> list[int]:
    return [ord(c) - 32 for c in text]


def after(text: str, n: int) -> str:
    """What the fake engine generates greedily after ``text``: the next n characters."""
    return "".join(chr(ord(text[-1]) + 1 + i) for i in range(n))


@pytest.fixture
def served(http_fakes):
    s = Served(http_fakes)
    yield s
    s.close()


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


# -- completions -------------------------------------------------------------------------------------


def test_completion_text_usage_finish_reason(served):
    r = served.client.completions.create(model=MODEL, prompt="ab", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert [c.text for c in r.choices] == [after("ab", 4)]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7)  # BOS + "ab"
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    served.idle()


def test_completion_stream_equals_whole_and_reports_usage(served):
    chunks = list(served.client.completions.create(model=MODEL, prompt="ab", max_tokens=5, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == after("ab", 5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    raw = served.post("/v1/completions", {"prompt": "ab", "max_tokens": 2, "temperature": 0, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in raw.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


def test_prompt_forms_and_n(served):
    r = served.client.completions.create(model=MODEL, prompt=["ab", "xy"], max_tokens=2, temperature=0, n=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "cd"), (1, "cd"), (2, "z{"), (3, "z{")]
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 8  # each prompt counted once
    r = served.client.completions.create(model=MODEL, prompt=ids("ab"), max_tokens=2, temperature=0)
    assert r.choices[0].text == "cd" and r.usage.prompt_tokens == 2  # token ids: no BOS added
    r = served.client.completions.create(model=MODEL, prompt=[ids("ab"), ids("k")], max_tokens=1, temperature=0)
    assert [c.text for c in r.choices] == ["c", "l"]
    served.idle()


def test_logprobs_and_top_alternatives(served):
    r = served.client.completions.create(model=MODEL, prompt="ab", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == list("cde") and lp.token_logprobs == [-0.25] * 3
    assert lp.top_logprobs == [{"c": -0.25, "d": -1.25}, {"d": -0.25, "e": -1.25}, {"e": -0.25, "f": -1.25}]
    assert lp.text_offset == [0, 1, 2]
    r = served.client.completions.create(model=MODEL, prompt="ab", max_tokens=1, temperature=0)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_prompt_logprobs_as_lm_eval_reads_them(served, max_tokens):
    prompt = ids("abd")  # b follows a (-1), d does not follow b (-5); top-1 after b is c
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1,
                                         echo=True)
    c = r.choices[0]
    assert c.text == "abd" + after("abd", max_tokens)
    lp = c.logprobs
    assert lp.tokens[:3] == list("abd") and lp.token_logprobs[:3] == [None, -1.0, -5.0]
    assert lp.top_logprobs[:3] == [None, {"b": -1.0}, {"c": -1.0, "d": -5.0}]
    assert len(lp.tokens) == 3 + max_tokens
    # lm-eval's parse: sum(token_logprobs[ctxlen:-1]) with max_tokens 1, and greedy iff each equals its top
    if max_tokens == 1:
        ctxlen = 1
        assert sum(lp.token_logprobs[ctxlen:-1]) == -6.0
        assert [t == max(top.values()) for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1])] == [
            True, False]
    assert r.usage.completion_tokens == max_tokens
    served.idle()


def test_stop_strings_and_stop_token_ids(served):
    r = served.client.completions.create(model=MODEL, prompt="a", max_tokens=10, temperature=0, stop=["e", "zz"])
    assert r.choices[0].text == "bcd" and r.choices[0].finish_reason == "stop"
    r = served.client.completions.create(model=MODEL, prompt="a", max_tokens=10, temperature=0, stop="c")
    assert r.choices[0].text == "b"
    r = served.client.completions.create(model=MODEL, prompt="a", max_tokens=10, temperature=0,
                                         extra_body={"stop_token_ids": ids("d")})
    assert r.choices[0].text.startswith("bc") and r.choices[0].finish_reason == "stop"
    chunks = list(served.client.completions.create(model=MODEL, prompt="a", max_tokens=10, temperature=0, stop="e",
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "bcd" and chunks[-1].choices[0].finish_reason == "stop"


def test_seeds_reproducible_and_distinct(served):
    def sample(seed, n=1):
        r = served.client.completions.create(model=MODEL, prompt="a", max_tokens=8, temperature=1.0, seed=seed, n=n)
        return [c.text for c in r.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    two = sample(7, n=2)
    assert two[0] == sample(7)[0] and two[0] != two[1]  # choice j samples with seed + j
    assert two[1] == sample(8)[0]


# -- chat --------------------------------------------------------------------------------------------


def test_chat_whole_and_streamed(served):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "h"},
                                                                               {"type": "text", "text": "i"}]}]
    prompt = "[system]s[user]hi[assistant]"
    r = served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == after(prompt, 3) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 1 + len(prompt) and r.usage.completion_tokens == 3
    chunks = list(served.client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == after(prompt, 3)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length" and chunks[-1].usage.total_tokens == (
        r.usage.total_tokens)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_logprobs_n_and_stop(served):
    msgs = [{"role": "user", "content": "a"}]
    prompt = "[user]a[assistant]"
    r = served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0, logprobs=True,
                                              top_logprobs=2, n=2)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content == after(prompt, 2)
    content = r.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in content] == [(ch, -0.25) for ch in after(prompt, 2)]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in content][0] == [("^", -0.25), ("_", -1.25)]
    assert content[0].bytes == list(b"^")
    r = served.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, stop=["`"])
    assert r.choices[0].message.content == "^_" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].logprobs is None


def test_chat_without_template_is_400(http_fakes):
    class NoTemplate(http_fakes.Tokenizer):
        chat_template = None

        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ValueError("this tokenizer has no chat template")

    s = Served(http_fakes, tokenizer=NoTemplate())
    try:
        err = error_of(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}), 400)
        assert "no chat template" in err["message"] and err["param"] == "messages"
    finally:
        s.close()


# -- tokenizer, models, health, metrics ------------------------------------------------------------


def test_tokenizer_endpoints_in_vllms_shapes(served):
    assert served.post("/tokenize", {"prompt": "ab"}).json()["tokens"] == [95, *ids("ab")]
    r = served.post("/tokenize", {"prompt": "ab", "add_special_tokens": False}).json()
    assert r["tokens"] == ids("ab") and r["count"] == 2 and r["max_model_len"] == 64
    assert served.post("/tokenize", {"messages": [{"role": "user", "content": "a"}]}).json()["tokens"][1:] == ids(
        "[user]a[assistant]")
    assert served.post("/detokenize", {"tokens": ids("hi")}).json() == {"prompt": "hi"}
    err = error_of(served.post("/detokenize", {"tokens": [500]}), 400)
    assert "vocab_size=97" in err["message"] and err["param"] == "tokens"
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["model_max_length"]) == ("</s>", "<s>", 64)
    assert "{% for m in messages %}" in info["chat_template"]


def test_models_health_ready_metrics(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/ready").json()["status"] == "ready"
    served.client.completions.create(model=MODEL, prompt="a", max_tokens=2)
    text = httpx.get(served.url + "/metrics").text
    assert 'jaxinfer_http_requests_total{code="200",route="/v1/completions"} 1.0' in text
    assert "jaxinfer_requests_finished_total" in text  # the scheduler's, same registry


def test_grpc_and_http_share_one_scheduler(served):
    s = served
    with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        grpc_text = "".join(r.text for r in stub.Generate(pb.GenerateRequest(prompt="ab", max_tokens=3), timeout=10))
    http_text = s.client.completions.create(model=MODEL, prompt="ab", max_tokens=3, temperature=0).choices[0].text
    assert grpc_text == http_text == "cde"
    assert s.metrics.value("jaxinfer_requests_started_total") == 2


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 100}, "max_tokens", "max_len=64"),
    ("/v1/completions", {"prompt": "a", "temperature": 500}, "temperature", "must be in [0, 100]"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs", "[0, 20]"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n", "[1, 16]"),
    ("/v1/completions", {"prompt": "a", "suffix": "z"}, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ("/v1/completions", {"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown field"),
    ("/v1/completions", {"max_tokens": 1}, "prompt", "required"),
    ("/v1/completions", {"prompt": [1, 500]}, "prompt_token_ids", "vocab_size=97"),
    ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, "stop", "limit 16"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}},
     "response_format", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
     "tools", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs",
     "logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, "messages", "unknown chat role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "only text"),
])
def test_400_names_the_field_and_limit(served, path, body, param, needle):
    err = error_of(served.post(path, body), 400)
    assert err["param"] == param and needle in err["message"], err
    assert err["type"] == "invalid_request_error"
    served.idle()


def test_openai_client_raises_bad_request(served):
    with pytest.raises(openai.BadRequestError, match="exceeds the context limit"):
        served.client.completions.create(model=MODEL, prompt="a", max_tokens=1000)


def test_401_without_the_key_health_stays_open(http_fakes, tmp_path):
    s = Served(http_fakes, http={"api_key": "sesame"})
    try:
        assert s.client.completions.create(model=MODEL, prompt="a", max_tokens=1, temperature=0).choices[0].text == "b"
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            bad.completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert "missing API key" in error_of(s.post("/v1/completions", {"prompt": "a"}), 401)["message"]
        error_of(s.post("/tokenize", {"prompt": "a"}), 401)
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(s.url + path).status_code == 200
    finally:
        s.close()


def test_api_key_defaults_to_the_grpc_token(http_fakes):
    s = Served(http_fakes, auth_token="tok")
    try:
        error_of(s.post("/v1/completions", {"prompt": "a"}), 401)
        ok = s.post("/v1/completions", {"prompt": "a", "max_tokens": 1}, headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200
    finally:
        s.close()


def test_404_unknown_route_and_model(served):
    assert "no route" in error_of(httpx.get(served.url + "/v2/nothing"), 404)["message"]
    err = error_of(served.post("/v1/completions", {"model": "gpt-9", "prompt": "a"}), 404)
    assert err["param"] == "model" and MODEL in err["message"]
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-9")


def test_413_oversized_body(http_fakes):
    s = Served(http_fakes, http={"max_body_bytes": 1000})
    try:
        err = error_of(s.post("/v1/completions", {"prompt": "a" * 2000}), 413)
        assert "1000 bytes" in err["message"]

        def chunks():  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"a" * 100
            yield b'"}'

        r = httpx.post(s.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        error_of(r, 413)
        assert s.post("/v1/completions", {"prompt": "a", "max_tokens": 1}).status_code == 200
    finally:
        s.close()


def test_429_when_the_queue_is_full(http_fakes):
    s = Served(http_fakes, max_queue_requests=2)
    sched, eng = s.server.scheduler, s.engine
    try:
        eng.gate.clear()  # the loop blocks in its first decode: nothing leaves the queue
        held = [sched.submit(Request(tuple(ids("a")), 4))]
        wait_for(lambda: eng.active_rows() == 1)
        held += [sched.submit(Request(tuple(ids("a")), 4)) for _ in range(2)]
        err = error_of(s.post("/v1/completions", {"prompt": "a", "max_tokens": 1}), 429)
        assert "max_queue_requests=2" in err["message"]
        with pytest.raises(openai.RateLimitError):
            s.client.completions.create(model=MODEL, prompt="a", max_tokens=1)
        eng.gate.set()
        for h in held:
            assert list(h)[-1].finish_reason == "length"
    finally:
        eng.gate.set()
        s.close()


def test_503_while_draining(http_fakes):
    s = Served(http_fakes)
    eng = s.engine
    try:
        eng.gate.clear()
        inflight = s.server.scheduler.submit(Request(tuple(ids("a")), 3))
        wait_for(lambda: eng.active_rows() == 1)
        drained = threading.Thread(target=s.server.scheduler.drain, args=(10.0,))
        drained.start()
        wait_for(lambda: not s.server.scheduler.load().accepting)
        assert "draining" in error_of(s.post("/v1/completions", {"prompt": "a"}), 503)["message"]
        error_of(httpx.get(s.url + "/ready"), 503)
        assert httpx.get(s.url + "/health").status_code == 200  # alive, just not taking work
        eng.gate.set()
        drained.join(10)
        assert list(inflight)[-1].finish_reason == "length"
    finally:
        eng.gate.set()
        s.close()


def test_error_mid_stream_reaches_the_client(http_fakes):
    class Failing(http_fakes.Detokenizer):
        def add(self, ids_):
            if 70 in ids_:  # "f"
                raise ValueError("cannot decode")
            return super().add(ids_)

    s = Served(http_fakes, detokenizer=Failing)
    try:
        raw = s.post("/v1/completions", {"prompt": "a", "max_tokens": 8, "temperature": 0, "stream": True})
        events = [json.loads(e[6:]) for e in raw.text.split("\n\n") if e.startswith("data: {")]
        assert "error" in events[-1] and events[-1]["error"]["code"] == 500
        assert raw.text.rstrip().endswith("data: [DONE]")
        err = error_of(s.post("/v1/completions", {"prompt": "a", "max_tokens": 8, "temperature": 0}), 500)
        assert "cannot decode" in err["message"]
        s.idle()
    finally:
        s.close()


# -- disconnects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot_within_a_step(http_fakes, stream):
    engine = http_fakes.Engine(step_delay=0.02)
    s = Served(http_fakes, engine=engine)
    try:
        body = {"prompt": "a", "max_tokens": 60, "temperature": 0, "stream": stream}
        with httpx.Client(timeout=30) as c:
            if stream:
                with c.stream("POST", s.url + "/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    got = [next(lines) for _ in range(6)]
                    assert any(line.startswith("data: {") for line in got)
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post(s.url + "/v1/completions", json=body, timeout=0.3)
        gone_at = engine.decode_calls
        wait_for(lambda: engine.active_rows() == 0, timeout=5)
        assert engine.decode_calls - gone_at <= 3  # freed within a step or so of the close being seen
        assert engine.decode_calls < 55  # not decoded to the end
        s.idle()
        assert s.metrics.value("jaxinfer_requests_finished_total", {"reason": "cancelled"}) == 1
    finally:
        s.close()


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls_with_the_grpc_certificate(http_fakes, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    srv = build_server(
        http_fakes.Engine(), http_fakes.Tokenizer(), ModelDescription(MODEL),
        ServerOptions(host="localhost", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()),
        detokenizer=http_fakes.Detokenizer, http=HttpOptions(host="localhost", port=0),
    ).start()
    try:
        assert srv.http.url.startswith("https://localhost:")
        client = openai.OpenAI(base_url=srv.http.url + "/v1", api_key="x", max_retries=0,
                               http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))))
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0).choices[0].text == "bc"
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.http.url.replace("https", "http") + "/health", timeout=5)
    finally:
        srv.stop()


# -- the serving benchmark over either protocol -----------------------------------------------------


def test_bench_serve_over_openai_and_grpc_same_requests(served, tmp_path):
    from jaxinfer.cli import main

    docs = {}
    for protocol, server in (("openai", served.url), ("grpc", f"127.0.0.1:{served.server.port}")):
        out = tmp_path / f"{protocol}.json"
        rc = main(["bench", "serve", "--protocol", protocol, "--server", server, "--concurrency", "1,4",
                   "--num-requests", "8", "--input-len", "8", "--output-len", "8", "-o", str(out), "--no-progress"])
        assert rc == 0
        docs[protocol] = json.loads(out.read_text())
    for a, b in zip(docs["openai"]["runs"], docs["grpc"]["runs"]):
        assert (a["completed"], a["failed"], a["output_tokens"], a["input_tokens"]) == (8, 0, 64, 64)
        assert (b["completed"], b["output_tokens"], b["input_tokens"]) == (8, 64, 64)
        assert a["itl_ms"]["n"] == b["itl_ms"]["n"] == 8 * 7  # one streamed chunk per token, both ways
    assert docs["openai"]["model"]["name"] == MODEL and docs["openai"]["protocol"] == "openai"
    served.idle()


# -- drain and the serve command --------------------------------------------------------------------


def test_drain_finishes_http_streams_then_closes_the_port(http_fakes):
    engine = http_fakes.Engine(step_delay=0.01)
    s = Served(http_fakes, engine=engine)
    try:
        stream = s.client.completions.create(model=MODEL, prompt="A", max_tokens=40, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
        first = next(iter(stream))
        done = threading.Thread(target=s.server.drain, args=(10.0,))
        done.start()
        wait_for(lambda: not s.server.scheduler.load().accepting)
        error_of(httpx.get(s.url + "/ready"), 503)
        rest = list(stream)
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert len(text) == 40 and rest[-1].choices[0].finish_reason == "length"
        done.join(15)
        assert not done.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.client.close()


def test_serve_help_lists_the_http_flags():
    import argparse

    from jaxinfer.commands import bench, serve

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    serve.register(sub)
    bench.register(sub)
    args = parser.parse_args(["serve"])
    assert (args.http_port, args.no_http, args.api_key_file) == (8000, False, None)
    assert parser.parse_args(["serve", "--no-http", "--http-port", "0"]).no_http
    args = parser.parse_args(["bench", "serve", "--protocol", "openai"])
    assert args.protocol == "openai" and args.server is None
