"""In-process gRPC round trips: a real grpc.server on a loopback port, a real client stub,
the hand-computable fake engine of tests.helpers.fakes (next token = last + 1)."""

from __future__ import annotations

import argparse
import gc
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ServerOptions, build_server
from tests.helpers import wait_for
from tests.helpers.fakes import BOS, FakeDetokenizer, FakeEngine, FakeTokenizer, expected, logprob_of
from tests.helpers.served import MODEL, Served

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


# -- round trips -------------------------------------------------------------------------------------


def test_usage_reports_prompt_tokens_from_the_prefix_cache(served):
    prompt = "abcdefghij"  # BOS + 10 tokens: 2 full pages of 4 reusable, the last 3 prefilled
    first = served.generate(prompt=prompt, max_tokens=3)
    again = served.generate(prompt=prompt, max_tokens=3)
    assert first[0][-1].usage.cached_prompt_tokens == 0 and again[0][-1].usage.cached_prompt_tokens == 8
    assert first[1] == again[1] and first[2] == again[2]
    served.idle()


def test_generate_streams_tokens_text_logprobs_usage(served):
    resps, ids, text = served.generate(prompt="abc", max_tokens=5, logprobs=2, echo=True, request_id="rq-1")
    assert text == "defgh" and ids == expected(FakeTokenizer().encode("abc"), 5)
    assert len(resps) == 5 and all(r.request_id == "rq-1" for r in resps)
    assert list(resps[0].prompt_token_ids) == [BOS, 65, 66, 67] and not resps[1].prompt_token_ids
    lp = resps[0].logprobs[0]
    assert lp.token_id == ids[0] and lp.logprob == pytest.approx(logprob_of([BOS, 65, 66, 67]))
    assert list(lp.top_token_ids) == [ids[0], ids[0] + 1]
    last = resps[-1]
    assert last.finish_reason == "length" and all(not r.finish_reason for r in resps[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens) == (4, 5, 0)
    assert 0 <= last.timings.queue_seconds <= last.timings.ttft_seconds <= last.timings.total_seconds
    # no logprobs asked: none sent; server default max_tokens (8) when unset
    resps, ids, _ = served.generate(prompt_token_ids=[10])
    assert ids == list(range(11, 19)) and not any(r.logprobs for r in resps) and not resps[0].request_id == ""
    served.idle()


def test_default_detokenizer_is_the_real_incremental_one():
    srv = build_server(FakeEngine(), FakeTokenizer(), MODEL).start()  # no detokenizer given
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            resps = list(pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="abc", max_tokens=5, stop=["gh"]), timeout=10))
        assert "".join(r.text for r in resps) == "def" and resps[-1].finish_reason == "stop"
    finally:
        srv.stop()


def test_stop_conditions_over_grpc(served):
    _, _, text = served.generate(prompt="c", max_tokens=10, stop=["fg"])
    assert text == "de"
    resps, ids, text = served.generate(prompt_token_ids=[94], max_tokens=10)
    assert ids == [BOS, 96] and resps[-1].finish_reason == "stop"
    _, ids, _ = served.generate(prompt_token_ids=[94], max_tokens=4, ignore_eos=True)
    assert ids == [BOS, 96, 0, 1]
    _, _, text = served.generate(prompt="a", max_tokens=10, stop_token_ids=[ord("e") - 32])
    assert text == "bcd"


def test_chat_messages_use_the_template(served):
    resps, ids, _ = served.generate(
        messages=[pb.ChatMessage(role="system", content="x"), pb.ChatMessage(role="user", content="hi")],
        max_tokens=2, echo=True,
    )
    assert list(resps[0].prompt_token_ids) == FakeTokenizer().encode("[system]x[user]hi[assistant]")
    assert ids == [ord("]") - 32 + 1, ord("]") - 32 + 2]
    code, msg = code_of(lambda: served.generate(messages=[pb.ChatMessage(role="wizard", content="x")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages" in msg and "unknown chat role 'wizard'" in msg


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(), "prompt is empty"),
        (dict(prompt="a", prompt_token_ids=[1]), "give exactly one of prompt, prompt_token_ids, messages"),
        (dict(prompt="a" * 60, max_tokens=10), "prompt of 61 tokens + max_tokens=10 = 71 exceeds the context limit max_len=64"),
        (dict(prompt="a" * 70), "exceeds the context limit max_len=64"),
        (dict(prompt="a", max_tokens=0), "max_tokens=0 must be >= 1"),
        (dict(prompt="a", max_tokens=3, min_tokens=4), "min_tokens=4 must be in [0, max_tokens=3]"),
        (dict(prompt="a", temperature=-0.5), "temperature=-0.5 must be in [0, 100]"),
        (dict(prompt="a", top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(prompt="a", top_k=1000), "top_k=1000 must be in [0, 97]"),
        (dict(prompt="a", min_p=1.0), "min_p=1.0 must be in [0, 1)"),
        (dict(prompt="a", repetition_penalty=0.0), "repetition_penalty=0.0 must be in (0, 10]"),
        (dict(prompt="a", presence_penalty=3.0), "presence_penalty=3.0 must be in [-2, 2]"),
        (dict(prompt="a", logprobs=21), "logprobs=21 must be in [0, 20]"),
        (dict(prompt="a", seed=2**63), "seed=9223372036854775808 must be in [0, 2^63)"),
        (dict(prompt_token_ids=[1, 97]), "prompt_token_ids[1]=97 is out of range [0, vocab_size=97)"),
        (dict(prompt_token_ids=[-4]), "prompt_token_ids[0]=-4 is out of range"),
        (dict(prompt="a", stop_token_ids=[500]), "stop_token_ids[0]=500 is out of range"),
        (dict(prompt="a", stop=["s"] * 17), "17 stop strings (limit 16)"),
        (dict(prompt="a", stop=["s" * 300]), "stop[0] has 300 characters (must be 1..256)"),
        (dict(prompt="caf\u00e9"), "prompt: character"),
    ],
)
def test_invalid_argument_names_field_and_limit(served, kw, needle):
    t0 = time.monotonic()
    code, msg = code_of(lambda: served.generate(**kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg, msg
    assert time.monotonic() - t0 < 2
    assert served.metrics.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == 1
    assert served.metrics.value("jaxinfer_requests_started_total") == 0


def test_truncate_prompt_only_when_asked(served):
    prompt = "".join(chr(33 + i % 90) for i in range(70))
    resps, ids, _ = served.generate(prompt=prompt, max_tokens=4, truncate_prompt=True, echo=True)
    assert resps[-1].usage.truncated_prompt_tokens == 71 - 60 and resps[-1].usage.prompt_tokens == 60
    assert list(resps[0].prompt_token_ids) == FakeTokenizer().encode(prompt)[-60:]
    assert resps[-1].finish_reason == "length" and len(ids) == 4


def test_score_tokenize_detokenize_info(served):
    resp = served.stub.Score(pb.ScoreRequest(context="ab", continuations=["c", "cd", "cx"]), timeout=10)
    assert list(resp.context_token_ids) == [BOS, 65, 66]
    assert [s.logprob for s in resp.scores] == [-1.0, -2.0, -6.0]
    assert [s.is_greedy for s in resp.scores] == [True, True, False]
    assert list(resp.scores[2].token_ids) == [67, 88] and list(resp.scores[2].token_logprobs) == [-1.0, -5.0]
    code, msg = code_of(lambda: served.stub.Score(pb.ScoreRequest(context="a", continuations=[]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "continuations" in msg
    code, msg = code_of(lambda: served.stub.Score(pb.ScoreRequest(context="a", continuations=["b" * 70]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "continuations[0]" in msg and "max_len=64" in msg

    assert list(served.stub.Tokenize(pb.TokenizeRequest(text="ab"), timeout=5).token_ids) == [BOS, 65, 66]
    assert list(served.stub.Tokenize(pb.TokenizeRequest(text="ab", add_bos=False), timeout=5).token_ids) == [65, 66]
    chat = served.stub.Tokenize(pb.TokenizeRequest(messages=[pb.ChatMessage(role="user", content="q")]), timeout=5)
    assert chat.text == "[user]q[assistant]"
    assert served.stub.Detokenize(pb.DetokenizeRequest(token_ids=[65, 66, BOS]), timeout=5).text == "ab"
    code, msg = code_of(lambda: served.stub.Detokenize(pb.DetokenizeRequest(token_ids=[1000]), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids[0]=1000" in msg

    info = served.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (info.model, info.architecture, info.vocab_size, info.max_len, info.slots) == ("fake-97", "fake", 97, 64, 4)
    assert (info.mesh, info.dtype, info.prefill_chunk, info.max_queue_requests) == ("data=1,model=1", "float32", 8, 64)
    assert list(info.eos_token_ids) == [96] and info.version
    assert (info.page_size, info.num_pages, info.prefix_cache) == (4, 64, True)
    assert served.metrics.value("jaxinfer_grpc_requests_total", {"method": "Score", "code": "OK"}) == 1


def test_health_and_reflection(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "jaxinfer.v1.Inference"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"jaxinfer.v1.Inference", "grpc.health.v1.Health"} <= names


# -- concurrency -------------------------------------------------------------------------------------


def test_32_concurrent_streams_equal_solo():
    s = Served(FakeEngine(max_seqs=4, prefill_chunk=4))
    try:
        rng = random.Random(3)
        reqs = [
            dict(prompt_token_ids=[rng.randrange(0, 95) for _ in range(rng.randrange(1, 20))],
                 max_tokens=rng.randrange(1, 30), request_id=f"c{i}", logprobs=1)
            for i in range(32)
        ]
        solo = {r["request_id"]: s.generate(**r) for r in reqs}
        together = {}
        threads = [threading.Thread(target=lambda r=r: together.__setitem__(r["request_id"], s.generate(**r))) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for r in reqs:
            a, b = solo[r["request_id"]], together[r["request_id"]]
            assert (a[1], a[2], a[0][-1].finish_reason) == (b[1], b[2], b[0][-1].finish_reason)
            assert [lp.token_id for x in b[0] for lp in x.logprobs] == b[1]
        s.idle()
    finally:
        s.close()


def test_new_request_admitted_while_others_stream():
    s = Served(FakeEngine(max_seqs=4, max_len=256, prefill_chunk=4, step_delay=0.003))
    try:
        streams = [s.stub.Generate(pb.GenerateRequest(prompt_token_ids=[i], max_tokens=150, ignore_eos=True), timeout=30)
                   for i in range(3)]
        firsts = [next(st) for st in streams]  # all three are streaming
        assert all(f.token_ids for f in firsts)
        counts = [0, 0, 0]
        done = threading.Event()

        def drain(i):
            for _ in streams[i]:
                counts[i] += 1
            done.set()

        readers = [threading.Thread(target=drain, args=(i,)) for i in range(3)]
        for t in readers:
            t.start()
        before = list(counts)
        t0 = time.monotonic()
        resps, ids, _ = s.generate(prompt_token_ids=[7] * 30, max_tokens=3)  # 8 prefill chunks
        took = time.monotonic() - t0
        assert ids == [8, 9, 10] and resps[-1].finish_reason == "length"
        assert not done.is_set(), "the new request had to wait for the running ones"
        assert all(c > b for c, b in zip(counts, before)), "running streams stalled"
        assert took < 1.0
        for t in readers:
            t.join(30)
        assert all(c == 149 for c in counts)
        s.idle()
    finally:
        s.close()


# -- faults ------------------------------------------------------------------------------------------


def test_client_cancel_frees_slot_within_a_step():
    eng = FakeEngine(max_seqs=2, max_len=1024, step_delay=0.01)
    s = Served(eng)
    try:
        call = s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=1000, ignore_eos=True), timeout=30)
        for _ in range(3):
            next(call)
        t_cancel = time.monotonic()
        call.cancel()
        wait_for(lambda: s.server.scheduler.load().active_seqs == 0, timeout=2)
        freed = time.monotonic() - t_cancel
        after = [c for c in eng.calls if c[0] == "decode" and c[2] > t_cancel]
        assert len(after) <= 2 and freed < 0.1, (len(after), freed)  # in flight + one dispatched meanwhile
        s.idle()
        assert s.metrics.finished_by_reason()["cancelled"] == 1
        assert s.metrics.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": "CANCELLED"}) == 1
    finally:
        s.close()


def test_disconnect_frees_slot():
    eng = FakeEngine(max_seqs=2, max_len=1024, step_delay=0.005)
    s = Served(eng)
    try:
        ch = s.new_channel()
        call = pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="a", max_tokens=1000, ignore_eos=True))
        next(call)
        ch.close()  # the client goes away without a word
        wait_for(lambda: s.server.scheduler.load().active_seqs == 0, timeout=2)
        s.idle()
    finally:
        s.close()


def test_deadline_exceeded_frees_slot():
    eng = FakeEngine(max_seqs=2, max_len=1024, step_delay=0.005)
    s = Served(eng)
    try:
        t0 = time.monotonic()
        code, _ = code_of(lambda: s.generate(prompt="a", max_tokens=1000, ignore_eos=True, timeout=0.15))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: s.server.scheduler.load().active_seqs == 0, timeout=2)
        assert time.monotonic() - t0 < 0.5
        s.idle()
        by = s.metrics.finished_by_reason()
        assert by["deadline"] + by["cancelled"] == 1
    finally:
        s.close()


def test_queue_full_is_resource_exhausted_at_once():
    eng = FakeEngine(max_seqs=1)
    eng.gate = threading.Event()  # hold decode: the slot stays busy, the queue fills
    s = Served(eng, max_queue_requests=2)
    try:
        # the first takes the only slot before the next two queue (were all three to
        # arrive before the loop admits one, the third would find the queue full)
        calls = [s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=3), timeout=30)]
        wait_for(lambda: s.server.scheduler.load().active_seqs == 1)
        calls += [s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=3), timeout=30) for _ in range(2)]
        wait_for(lambda: s.server.scheduler.load().queue_requests == 2)
        t0 = time.monotonic()
        code, msg = code_of(lambda: s.generate(prompt="a", max_tokens=3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_requests=2" in msg
        assert time.monotonic() - t0 < 1.0
        eng.gate.set()
        for c in calls:
            assert list(c)[-1].finish_reason == "length"
        s.idle()
        assert s.metrics.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}) == 1
    finally:
        s.close()


def test_queue_token_limit_and_message_size_limit():
    eng = FakeEngine(max_seqs=1)
    eng.gate = threading.Event()
    s = Served(eng, max_queue_tokens=64, max_message_bytes=2048)
    try:
        first = s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=3), timeout=30)
        wait_for(lambda: s.server.scheduler.load().active_seqs == 1)
        waiting = s.stub.Generate(pb.GenerateRequest(prompt="b" * 40, max_tokens=3), timeout=30)
        wait_for(lambda: s.server.scheduler.load().queue_tokens == 41)
        code, msg = code_of(lambda: s.generate(prompt="c" * 30, max_tokens=3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_tokens=64" in msg
        code, _ = code_of(lambda: s.generate(prompt="d" * 5000, max_tokens=3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # grpc's own message size bound
        eng.gate.set()
        assert list(first)[-1].finish_reason == list(waiting)[-1].finish_reason == "length"
        s.idle()
    finally:
        s.close()


def test_error_in_one_request_is_internal_others_go_on():
    eng = FakeEngine(max_seqs=4, step_delay=0.001, fail_prefill_token=90)
    s = Served(eng, FakeTokenizer(poison=[ord("#") - 32]))
    try:
        good = s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=20), timeout=30)
        next(good)
        code, msg = code_of(lambda: s.generate(prompt="!", max_tokens=5))
        assert code == grpc.StatusCode.INTERNAL and "cannot decode token 3" in msg
        code, msg = code_of(lambda: s.generate(prompt_token_ids=[90], max_tokens=5))
        assert code == grpc.StatusCode.INTERNAL and "injected prefill failure" in msg
        assert list(good)[-1].finish_reason == "length"
        assert s.generate(prompt="a", max_tokens=3)[2] == "bcd"
        s.idle()
        assert s.metrics.finished_by_reason()["error"] == 2
    finally:
        s.close()


def test_drain_refuses_new_finishes_inflight():
    eng = FakeEngine(max_seqs=2, max_len=256, step_delay=0.003)
    s = Served(eng)
    try:
        calls = [s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=60, ignore_eos=True), timeout=30) for _ in range(3)]
        for c in calls[:2]:
            next(c)
        results: list = []
        readers = [threading.Thread(target=lambda c=c: results.append(list(c)[-1].finish_reason)) for c in calls]
        for t in readers:
            t.start()
        outcome: list = []
        drainer = threading.Thread(target=lambda: outcome.append(s.server.drain(grace=10)))
        drainer.start()
        health = health_pb2_grpc.HealthStub(s.channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING)
        code, msg = code_of(lambda: s.generate(prompt="a", max_tokens=2))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in msg
        for t in readers:
            t.join(30)
        drainer.join(30)
        assert results == ["length"] * 3 and outcome == [True]
    finally:
        s.close()


def test_drain_grace_elapsed_ends_streams_unavailable():
    eng = FakeEngine(max_seqs=1, max_len=4096, step_delay=0.005)
    s = Served(eng)
    try:
        call = s.stub.Generate(pb.GenerateRequest(prompt="a", max_tokens=4000, ignore_eos=True), timeout=30)
        next(call)
        assert s.server.drain(grace=0.05) is False
        code, msg = code_of(lambda: list(call))
        assert code == grpc.StatusCode.UNAVAILABLE and "grace period" in msg
    finally:
        s.close()


# -- auth, TLS, metrics ------------------------------------------------------------------------------


def test_bearer_token_auth_health_stays_open():
    s = Served(auth_token="s3cret")
    try:
        code, msg = code_of(lambda: s.generate(prompt="a", max_tokens=2))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in msg
        code, _ = code_of(lambda: s.generate(prompt="a", max_tokens=2, metadata=(("authorization", "Bearer nope"),)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = code_of(lambda: s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert s.generate(prompt="a", max_tokens=2, metadata=(("authorization", "Bearer s3cret"),))[2] == "bc"
        health = health_pb2_grpc.HealthStub(s.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert s.metrics.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": "UNAUTHENTICATED"}) == 2
    finally:
        s.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    srv = build_server(
        FakeEngine(), FakeTokenizer(), MODEL, ServerOptions(host="localhost", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()),
        detokenizer=FakeDetokenizer,
    ).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            out = list(pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="a", max_tokens=3), timeout=10))
            assert "".join(r.text for r in out) == "bcd"
        with grpc.insecure_channel(f"localhost:{srv.port}") as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.InferenceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
    finally:
        srv.stop()


def test_metrics_http_exporter(served):
    served.generate(prompt="a", max_tokens=3)
    port = served.metrics.serve_http(0, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        served.metrics.close()
    for name in ("jaxinfer_time_to_first_token_seconds_bucket", "jaxinfer_time_per_output_token_seconds_count",
                 "jaxinfer_e2e_request_latency_seconds_count", "jaxinfer_queue_requests", "jaxinfer_queue_tokens",
                 "jaxinfer_active_seqs", "jaxinfer_kv_cache_usage_ratio", 'jaxinfer_kv_pages{state="used"}',
                 "jaxinfer_preemptions_total", "jaxinfer_prefix_cache_hit_rate", "jaxinfer_prompt_tokens_total 2.0",
                 "jaxinfer_generation_tokens_total 3.0", 'jaxinfer_requests_finished_total{reason="length"} 1.0',
                 'jaxinfer_grpc_requests_total{code="OK",method="Generate"} 1.0'):
        assert name in body, name


# -- CLI ---------------------------------------------------------------------------------------------


def test_client_cli_round_trip(served, capsys):
    from jaxinfer.commands import client

    parser = argparse.ArgumentParser()
    client.register(parser.add_subparsers(dest="command"))
    addr = f"127.0.0.1:{served.server.port}"

    def run(*argv):
        args = parser.parse_args(["client", *argv])
        return args.func(args)

    assert run("generate", "--server", addr, "abc", "--max-tokens", "4") == 0
    out = capsys.readouterr()
    assert out.out == "defg\n" and "finish=length" in out.err
    assert run("score", "--server", addr, "--context", "ab", "--continuation", "cd") == 0
    assert '"logprob": -2.0' in capsys.readouterr().out
    assert run("tokenize", "--server", addr, "ab") == 0 and capsys.readouterr().out.strip() == "95,65,66"
    assert run("detokenize", "--server", addr, "65,66") == 0 and capsys.readouterr().out.strip() == "ab"
    assert run("info", "--server", addr) == 0 and '"vocab_size": 97' in capsys.readouterr().out
    assert run("health", "--server", addr) == 0 and capsys.readouterr().out.strip() == "SERVING"
    assert run("generate", "--server", addr, "a", "--max-tokens", "0") == 1
    assert "INVALID_ARGUMENT: max_tokens=0" in capsys.readouterr().err


def test_serve_help_lists_the_flags():
    from jaxinfer.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--model", "--port", "--host", "--mesh", "--max-seqs", "--max-len", "--page-size", "--kv-cache-memory",
                 "--no-prefix-cache", "--max-queue-requests",
                 "--max-queue-tokens", "--dtype", "--weight-dtype", "--auth-token-file", "--tls-cert", "--tls-key", "--metrics-port",
                 "--grace-period", "smollm2-135m-instruct"):
        assert flag in text
    assert "--slots" not in text and "--span-steps" not in text


def test_engine_flags_map_onto_engine_config():
    from jaxinfer.commands import serve
    from jaxinfer.commands.common import engine_config
    from jaxinfer.engine.config import EngineConfig

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--max-seqs", "32", "--page-size", "8", "--kv-cache-memory", "64MiB",
                              "--no-prefix-cache", "--prefill-buckets", "16,64"])
    cfg = engine_config(args, lazy_compile=False)
    assert (cfg.max_seqs, cfg.page_size, cfg.kv_cache_bytes, cfg.prefill_buckets) == (32, 8, 64 << 20, (16, 64))
    assert cfg.max_len is None and cfg.decode_steps == EngineConfig().decode_steps and args.no_prefix_cache
    assert engine_config(parser.parse_args(["serve"]), lazy_compile=True).page_size == EngineConfig().page_size


SIGTERM_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from tests.helpers.fakes import FakeEngine, FakeTokenizer, FakeDetokenizer
from jaxinfer.commands.serve import serve_until_signal
from server.app import ModelDescription, ServerOptions, build_server
srv = build_server(FakeEngine(max_seqs=2, max_len=512, step_delay=0.005), FakeTokenizer(),
                   ModelDescription("fake"), ServerOptions(port=0, grace_period=10), detokenizer=FakeDetokenizer)
sys.exit(serve_until_signal(srv))
"""


def test_sigterm_drains_then_exits_zero():
    # `python -c` from the repository root imports the `tests` package from there
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = None
        for line in proc.stderr:
            if "SERVING on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "server did not start"
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.InferenceStub(ch).Generate(
                pb.GenerateRequest(prompt="a", max_tokens=100, ignore_eos=True), timeout=30
            )
            next(call)
            proc.send_signal(signal.SIGTERM)
            rest = list(call)
        assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == 100
        assert proc.wait(20) == 0
        assert any("received SIGTERM: draining" in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- soak --------------------------------------------------------------------------------------------


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("seed", [11])
def test_soak_random_faults_over_grpc(seed):
    eng = FakeEngine(max_seqs=4, max_len=96, prefill_chunk=5, step_delay=0.0005)
    s = Served(eng, FakeTokenizer(poison=[77]), max_queue_requests=24, max_queue_tokens=400)
    try:
        rss = []
        for round_ in range(3):  # the same load three times: memory must not keep growing
            _soak_round(s, random.Random(seed + round_))
            s.idle()  # zero active slots, empty queue, started == finished by reason
            gc.collect()
            rss.append(_max_rss_bytes())
        assert rss[2] - rss[0] < 32 * 2**20, f"peak RSS grew {(rss[2] - rss[0]) / 2**20:.1f} MiB over two rounds"
    finally:
        s.close()


def _soak_round(s: "Served", rng: random.Random) -> None:
    plans = [(rng.choice(["ok", "ok", "ok", "cancel", "deadline", "bad", "stop", "disconnect"]), rng.random())
             for _ in range(240)]
    outcomes: dict[int, str] = {}
    base_started = s.metrics.value("jaxinfer_requests_started_total")
    base_rejected = sum(
        s.metrics.value("jaxinfer_requests_rejected_total", {"cause": c}) for c in ("invalid", "queue_full", "unavailable")
    )
    codes_seen = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED", "INTERNAL")
    base_codes = sum(s.metrics.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": c})
                     for c in codes_seen)
    base_finished = dict(s.metrics.finished_by_reason())

    def client(i, kind, r):
        local = random.Random(i)
        req = pb.GenerateRequest(
            prompt_token_ids=[local.randrange(0, 95) for _ in range(local.randrange(1, 30))],
            max_tokens=local.randrange(1, 40), request_id=f"soak{i}",
        )
        if kind == "bad":
            req.temperature = -1.0
        if kind == "stop":
            req.stop.append("m")
        ch = s.new_channel() if kind == "disconnect" else s.channel
        timeout = 0.005 + 0.02 * r if kind == "deadline" else 30
        call = pb_grpc.InferenceStub(ch).Generate(req, timeout=timeout)
        outcome = "NO_FINISH"
        try:
            for n, resp in enumerate(call):
                if resp.finish_reason:
                    outcome = resp.finish_reason
                elif kind == "cancel" and n == 1:
                    call.cancel()
                elif kind == "disconnect" and n == 1:
                    ch.close()
        except grpc.RpcError as e:
            outcome = e.code().name
        except ValueError:  # iterating a call whose channel we closed
            outcome = "DISCONNECTED"
        finally:
            outcomes[i] = outcome
            if kind == "disconnect":
                ch.close()

    threads = []
    for i, (kind, r) in enumerate(plans):
        t = threading.Thread(target=client, args=(i, kind, r))
        t.start()
        threads.append(t)
        if i % 6 == 0:
            time.sleep(0.003)
    for t in threads:
        t.join(30)
    served_anyway = {"length", "stop", "INTERNAL", "RESOURCE_EXHAUSTED"}  # finished first / poison / full
    allowed = {
        "ok": served_anyway, "stop": served_anyway, "bad": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},  # grpc's concurrent-RPC bound
        "deadline": served_anyway | {"DEADLINE_EXCEEDED"}, "cancel": served_anyway | {"CANCELLED"},
        "disconnect": served_anyway | {"DISCONNECTED", "CANCELLED"},
    }
    assert len(outcomes) == len(plans)
    for i, (kind, _) in enumerate(plans):
        assert outcomes[i] in allowed[kind], (i, kind, outcomes[i])
    m = s.metrics
    # every call that reached the handler is counted once (a few deadline calls expire before it)
    reached = m.value("jaxinfer_requests_started_total") - base_started + sum(
        m.value("jaxinfer_requests_rejected_total", {"cause": c}) for c in ("invalid", "queue_full", "unavailable")
    ) - base_rejected
    wait_for(lambda: sum(m.value("jaxinfer_grpc_requests_total", {"method": "Generate", "code": c})
                         for c in codes_seen) - base_codes == reached)
    assert reached <= len(plans)
    finished = {k: v - base_finished.get(k, 0) for k, v in m.finished_by_reason().items()}
    clients_done = sum(o in ("length", "stop") for o in outcomes.values())
    assert finished["length"] + finished["stop"] >= clients_done
    assert finished["error"] >= sum(o == "INTERNAL" for o in outcomes.values())
