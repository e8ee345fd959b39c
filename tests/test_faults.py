"""Fault injection: a failure inside one engine call, a tokenizer that fails on one request, a
device out of memory at start-up, SIGTERM under load.

The engine calls run on the real Engine over the tiny BPE checkpoint (``tiny_engine``), behind
the real scheduler and both front ends. The faults come from test-only wrappers: :class:`Faulty`
fails the next matching engine call either *before* the engine runs it (a host-side bug) or
*after* its device program took the donated decode state and KV pool (what a failing device
step does: the state is gone). The requests in the failed call end with INTERNAL / 500; every
other request, running at the time or sent later, is served with the tokens it gets alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import jax
import pytest

from jaxinfer.cli import main
from jaxinfer.engine.engine import Engine
from jaxinfer.metrics import Metrics
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ModelDescription, ServerOptions, build_server
from server.openai_api.server import HttpOptions
from tests.helpers import wait_for
from tests.helpers.tiny import LLAMA_TINY, engine_config, make_model

ROOT = Path(__file__).resolve().parents[1]
MARK = 301  # a prompt holding this token id is the one whose engine call fails
A, B, C, D = [0, 10, 11, 12, 13], [0, 20, 21, 22], [0, 30, 31], [0, 40, 41, 42, 43, 44]
POISONED = [0, MARK, 50]
LONG = 60  # tokens the streams generate: they are still decoding when the fault is armed


class Faulty:
    """The engine with one failure armed: ``arm(call, when)`` fails the next matching ``call``
    ("prefill" of a prompt holding MARK, "decode" or "read" of a step of two rows or more, "score")
    ``when`` = "before" the engine runs it or "after" its device program took the donated state."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.armed: tuple[str, str] | None = None
        self.delay = 0.0  # seconds per decode call: keeps the streams going while a test arms a fault

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def arm(self, call: str, when: str) -> None:
        self.armed = (call, when)

    def _trip(self, call: str, matches: bool = True) -> None:
        if self.armed is None or self.armed[0] != call or not matches:
            return
        _, when = self.armed
        self.armed = None
        if when == "before":
            raise RuntimeError(f"injected {call} failure")
        eng = self._engine
        real = type(eng)._exe.__get__(eng)

        def exe(key):  # the next program this call runs consumes its donated buffers, then fails
            del eng._exe
            k, program = real(key)

            def run(*args):
                program(*args)
                raise jax.errors.JaxRuntimeError(f"INTERNAL: injected {call} failure after the device call")
            return k, run
        eng._exe = exe

    def prefill(self, row, tokens, params, **kw):
        self._trip("prefill", MARK in tokens)
        return self._engine.prefill(row, tokens, params, **kw)

    def prefill_many(self, items):
        items = list(items)
        self._trip("prefill", any(MARK in it[1] for it in items))
        return self._engine.prefill_many(items)

    def decode(self, rows, pages, *steps):
        if self.delay:
            time.sleep(self.delay)
        self._trip("decode", len(rows) >= 2)
        handle = self._engine.decode(rows, pages, *steps)
        if self.armed is not None and self.armed[0] == "read" and len(rows) >= 2:
            _, when = self.armed
            self.armed = None
            return _FailingHandle(self._engine, when)
        return handle

    def score(self, tokens, targets, **kw):
        self._trip("score")
        return self._engine.score(tokens, targets, **kw)


class _FailingHandle:
    """A decode step whose result fails when read, as a step that failed on the device does
    ("after": its outputs, the engine's state now, are gone too)."""

    def __init__(self, engine: Engine, when: str) -> None:
        if when == "after":
            for leaf in jax.tree.leaves((engine.state, engine.pool)):
                leaf.delete()

    def result(self):
        raise jax.errors.JaxRuntimeError("INTERNAL: injected read failure")

    results = result


class FlakyTokenizer:
    """The tokenizer, failing on a snowman (a bug: RuntimeError), refusing a comet (the input's
    fault: ValueError) and failing to decode ``bad_token``."""

    def __init__(self, tokenizer, bad_token: int = -1) -> None:
        self._tok, self.bad_token = tokenizer, bad_token

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if "\u2603" in text:
            raise RuntimeError("injected tokenizer failure")
        if "\u2604" in text:
            raise ValueError("a comet cannot be encoded")
        return self._tok.encode(text, add_bos=add_bos)

    def decode(self, ids, skip_special: bool = True) -> str:
        if self.bad_token in list(ids):
            raise RuntimeError(f"injected detokenizer failure on token {self.bad_token}")
        return self._tok.decode(ids, skip_special)


def _serve(engine, tokenizer) -> SimpleNamespace:
    srv = build_server(engine, tokenizer, ModelDescription("tiny-bpe"),
                       ServerOptions(port=0, grace_period=5.0, default_max_tokens=8), metrics=Metrics(),
                       http=HttpOptions(port=0)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    return SimpleNamespace(server=srv, engine=engine, channel=channel, stub=pb_grpc.InferenceStub(channel),
                           url=srv.http.url)


def _close(s: SimpleNamespace) -> None:
    s.channel.close()
    s.server.stop()


@pytest.fixture
def served(tiny_engine):
    s = _serve(Faulty(tiny_engine), tiny_engine.tokenizer)
    yield s
    _close(s)


def _request(ids, n: int = LONG) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=ids, max_tokens=n, temperature=0.0, ignore_eos=True)


def solo(s, ids, n: int = LONG) -> tuple[list[int], str]:
    resps = list(s.stub.Generate(_request(ids, n), timeout=60))
    assert resps[-1].finish_reason == "length"
    return [t for r in resps for t in r.token_ids], "".join(r.text for r in resps)


def grpc_error(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


class GrpcStream(threading.Thread):
    def __init__(self, s, ids) -> None:
        super().__init__(daemon=True)
        self.call = s.stub.Generate(_request(ids), timeout=60)
        self.tokens, self.text, self.finish, self.code, self.details = [], "", None, None, ""
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for r in self.call:
                self.tokens += r.token_ids
                self.text += r.text
                self.finish = r.finish_reason or None
                self.first.set()
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()
        self.first.set()


class HttpStream(threading.Thread):
    """A streamed completion: its text, finish_reason, the error event if one came, and whether
    the stream ended with [DONE]."""

    def __init__(self, s, ids) -> None:
        super().__init__(daemon=True)
        self.body = {"prompt": ids, "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
        self.url, self.text, self.finish, self.error, self.done, self.exc = s.url, "", None, None, False, None
        self.status = None
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self._read()
        except Exception as e:  # the assertions say what broke
            self.exc = repr(e)
        self.first.set()

    def _read(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    self.error = obj["error"]
                else:
                    self.text += obj["choices"][0]["text"]
                    self.finish = obj["choices"][0]["finish_reason"]
                self.first.set()


def _idle(s) -> None:
    sched = s.server.scheduler
    wait_for(lambda: sched.load().live_requests == 0, 30)
    assert sched.blocks.stats().used == 0 and sched.load().active_seqs == 0
    m = s.server.metrics
    assert m.value("jaxinfer_requests_started_total") == sum(m.finished_by_reason().values())


def _two_streams(s):
    """A gRPC stream of A and an HTTP stream of B, both decoding."""
    s.engine.delay = 0.01
    a, b = GrpcStream(s, A), HttpStream(s, B)
    assert a.first.wait(60) and b.first.wait(60)
    assert a.finish is None and b.finish is None, "the streams ended before the fault was armed"
    return a, b


# -- an exception inside one engine call --------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failed_prefill_ends_that_request_only_and_the_others_are_served(served, when):
    """The prefill of one prompt fails while two streams decode: that request gets INTERNAL (gRPC)
    and 500 (HTTP); the two streams finish with the tokens they get alone (recomputed from their
    tokens when the failure took the engine's state with it), and later requests are served."""
    ref = {tuple(p): solo(served, p) for p in (A, B, C)}
    a, b = _two_streams(served)
    served.engine.arm("prefill", when)
    code, msg = grpc_error(lambda: solo(served, POISONED))
    assert code == grpc.StatusCode.INTERNAL and "prefill failed" in msg and "injected prefill failure" in msg
    # both streams decode again (recomputed, for "after") before the next failing prefill, so
    # that they are not in its call
    n_a, n_b = len(a.tokens), len(b.text)
    wait_for(lambda: len(a.tokens) > n_a + 1 and len(b.text) > n_b, 60)
    served.engine.arm("prefill", when)
    r = httpx.post(served.url + "/v1/completions", json={"prompt": POISONED, "max_tokens": 4}, timeout=60)
    assert r.status_code == 500 and "injected prefill failure" in r.json()["error"]["message"]
    a.join(60)
    b.join(60)
    assert (a.code, a.finish, a.tokens) == (None, "length", ref[tuple(A)][0])
    assert (b.error, b.finish, b.text, b.done) == (None, "length", ref[tuple(B)][1], True)
    served.engine.delay = 0.0
    assert solo(served, C) == ref[tuple(C)]
    _idle(served)
    assert served.server.metrics.finished_by_reason()["error"] == 2


@pytest.mark.parametrize("call", ["decode", "read"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failed_decode_step_ends_its_requests_and_later_ones_are_served(served, call, when):
    """A decode step of two streams fails at dispatch ("decode") or when its result is read
    ("read"): the gRPC stream ends INTERNAL, the HTTP stream with a 500 error event and [DONE];
    the requests after it get the tokens they get alone, over both front ends."""
    ref = {tuple(p): solo(served, p) for p in (C, D)}
    a, b = _two_streams(served)
    served.engine.arm(call, when)
    a.join(60)
    b.join(60)
    # ("after" a read: the next step, dispatched before the read, is the call that meets the lost state)
    named = "injected" if (call, when) != ("read", "after") else "decode step failed"
    assert a.code == grpc.StatusCode.INTERNAL and "decode step failed" in a.details and named in a.details
    assert b.error is not None and b.error["code"] == 500 and named in b.error["message"] and b.done
    served.engine.delay = 0.0
    assert solo(served, C) == ref[tuple(C)]
    r = httpx.post(served.url + "/v1/completions", timeout=60,
                   json={"prompt": D, "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref[tuple(D)][1]
    _idle(served)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failed_score_is_internal_and_500_and_a_running_stream_goes_on(served, when):
    ref = solo(served, A)
    served.engine.delay = 0.01
    a = GrpcStream(served, A)
    assert a.first.wait(60)
    served.engine.arm("score", when)
    code, msg = grpc_error(lambda: served.stub.Score(pb.ScoreRequest(context="one two", continuations=[" three"]),
                                                     timeout=60))
    assert code == grpc.StatusCode.INTERNAL and "injected score failure" in msg
    served.engine.arm("score", when)
    r = httpx.post(served.url + "/v1/completions", timeout=60,
                   json={"prompt": "one two three", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 500 and "injected score failure" in r.text
    a.join(60)
    assert (a.code, a.finish, a.tokens) == (None, "length", ref[0])
    ok = served.stub.Score(pb.ScoreRequest(context="one two", continuations=[" three"]), timeout=60)
    assert len(ok.scores) == 1
    _idle(served)


def test_without_recovery_a_lost_engine_state_fails_every_later_request(tiny_engine, monkeypatch):
    """What the recovery is for: an engine that cannot say it lost its state (no ``recover``)
    leaves every later request failing on the deleted buffers, while the server looks alive."""
    eng = Faulty(tiny_engine)
    monkeypatch.setattr(Faulty, "recover", None, raising=False)
    s = _serve(eng, tiny_engine.tokenizer)
    try:
        eng.arm("decode", "after")
        eng.delay = 0.01
        a, b = GrpcStream(s, A), GrpcStream(s, B)
        a.join(60)
        b.join(60)
        code, msg = grpc_error(lambda: solo(s, C))
        assert code == grpc.StatusCode.INTERNAL and "deleted" in msg
    finally:
        _close(s)
        tiny_engine.recover()  # the module's engine serves the other tests
    assert tiny_engine.recover() is False


# -- the tokenizer ------------------------------------------------------------------------------------


def test_a_tokenizer_failure_ends_that_request_only(tiny_engine):
    """encode fails (a bug): INTERNAL / 500; encode refuses the input: INVALID_ARGUMENT / 400;
    the detokenizer fails on a token mid-stream: INTERNAL / a 500 error event. A stream running
    meanwhile and the requests after are served."""
    plain = _serve(Faulty(tiny_engine), tiny_engine.tokenizer)
    try:
        ref = {tuple(p): solo(plain, p) for p in (A, B, C)}
    finally:
        _close(plain)
    bad = next(t for t in ref[tuple(B)][0] if t not in ref[tuple(A)][0] + ref[tuple(C)][0])
    s = _serve(Faulty(tiny_engine), FlakyTokenizer(tiny_engine.tokenizer, bad))
    try:
        s.engine.delay = 0.01
        a = GrpcStream(s, A)
        assert a.first.wait(60)
        code, msg = grpc_error(lambda: list(s.stub.Generate(pb.GenerateRequest(prompt="a \u2603", max_tokens=4),
                                                            timeout=60)))
        assert code == grpc.StatusCode.INTERNAL and "injected tokenizer failure" in msg
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a \u2603", "max_tokens": 4}, timeout=60)
        assert r.status_code == 500 and "injected tokenizer failure" in r.json()["error"]["message"]
        code, msg = grpc_error(lambda: list(s.stub.Generate(pb.GenerateRequest(prompt="a \u2604", max_tokens=4),
                                                            timeout=60)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in msg and "comet" in msg
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a \u2604", "max_tokens": 4}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        code, msg = grpc_error(lambda: solo(s, B))
        assert code == grpc.StatusCode.INTERNAL and f"injected detokenizer failure on token {bad}" in msg
        h = HttpStream(s, B)
        h.join(60)
        assert h.error is not None and h.error["code"] == 500 and h.done
        a.join(60)
        assert (a.code, a.finish, a.tokens, a.text) == (None, "length", *ref[tuple(A)])
        s.engine.delay = 0.0
        assert solo(s, C) == ref[tuple(C)]
        _idle(s)
    finally:
        _close(s)


# -- device out of memory at start-up -----------------------------------------------------------------


def test_device_out_of_memory_at_start_up_names_the_budget_and_the_flags(monkeypatch, capsys, tiny_ckpt):
    def oom(self):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.")

    monkeypatch.setattr(Engine, "_place_state", oom)
    with pytest.raises(ValueError) as e:
        Engine(make_model(LLAMA_TINY), engine_config(LLAMA_TINY, num_pages=4096))
    msg = str(e.value)
    assert "out of device memory allocating the KV cache pool: 4096 pages x 8 tokens" in msg
    assert "--kv-cache-memory" in msg and "--max-seqs=4" in msg and "lower --kv-cache-memory or --max-seqs" in msg
    assert main(["serve", "--model", str(tiny_ckpt), "--kv-cache-memory", "1024GiB", "--port", "0", "--no-http"]) == 2
    err = capsys.readouterr().err
    assert "jaxinfer serve: error: out of device memory allocating the KV cache pool" in err
    assert "--kv-cache-memory (EngineConfig.kv_cache_bytes)" in err and "Traceback" not in err


def test_other_runtime_errors_at_start_up_are_not_called_out_of_memory(monkeypatch):
    def broken(self):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(Engine, "_place_state", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        Engine(make_model(LLAMA_TINY), engine_config(LLAMA_TINY))


# -- SIGTERM under load -------------------------------------------------------------------------------


def _serve_process(tiny_ckpt: Path, grace: float) -> tuple[subprocess.Popen, list[str], int, str]:
    cmd = [sys.executable, "-m", "jaxinfer", "serve", "--model", str(tiny_ckpt), "--port", "0", "--http-port", "0",
           "--max-seqs", "4", "--max-len", "128", "--page-size", "8", "--prefill-buckets", "16,64",
           "--kv-cache-memory", "2MiB", "--grace-period", str(grace)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    grpc_port = http_url = None
    for line in proc.stderr:
        lines.append(line)
        if "SERVING on" in line:
            grpc_port = int(line.rsplit(":", 1)[1])
        if "OpenAI-compatible API on" in line:
            http_url = line.split(" on ", 1)[1].strip().removesuffix("/v1")
            break
    assert grpc_port and http_url, "".join(lines[-30:])
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines, grpc_port, http_url


@pytest.mark.slow
@pytest.mark.parametrize("grace", [60.0, 0.05], ids=["everything-finishes", "grace-elapses"])  # 0.05 s: too short for 12 streams on 4 rows on any machine
def test_sigterm_under_load_drains_within_the_grace_period_and_exits_zero(tiny_ckpt, grace):
    """12 streams (gRPC and HTTP) on 4 rows, SIGTERM once they run: new requests are refused at
    once; every stream either completes with all its tokens or (grace elapsed) ends with
    UNAVAILABLE / an error event naming the grace period, then [DONE]; nothing is cut silently;
    the process exits 0 within the grace period plus the time to stop."""
    proc, lines, port, url = _serve_process(tiny_ckpt, grace)
    try:
        s = SimpleNamespace(stub=None, url=url)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        s.stub = pb_grpc.InferenceStub(channel)
        streams = [GrpcStream(s, [0, 10 + i, 11]) if i % 2 else HttpStream(s, [0, 10 + i, 11]) for i in range(12)]
        def started() -> float:
            text = httpx.get(url + "/metrics", timeout=10).text
            return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("jaxinfer_requests_started_total")))

        wait_for(lambda: started() == 12 and sum(st.first.is_set() for st in streams) >= 4, 120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any("received SIGTERM: draining" in ln for ln in lines), 10)
        code, msg = grpc_error(lambda: list(s.stub.Generate(_request(C, 4), timeout=10)))
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in msg
        for st in streams:
            st.join(grace + 30)
        rc = proc.wait(grace + 30)
        seconds = time.monotonic() - t0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0 and seconds < grace + 20, (rc, seconds, "".join(lines[-20:]))
    completed = cut = 0
    for st in streams:
        if isinstance(st, GrpcStream):
            if st.code is None:
                assert st.finish == "length" and len(st.tokens) == LONG
                completed += 1
            else:
                assert st.code == grpc.StatusCode.UNAVAILABLE and "grace period" in st.details, (st.code, st.details)
                cut += 1
        else:
            assert st.status == 200 and st.done, ("an HTTP stream ended without [DONE]", st.status, st.finish, st.error,
                                                  len(st.text), st.exc)
            if st.error is None:
                assert st.finish == "length"
                completed += 1
            else:
                assert st.error["code"] == 503 and "grace period" in st.error["message"], st.error
                cut += 1
    assert completed + cut == 12
    if grace > 30:
        assert cut == 0 and any("shut down cleanly" in ln for ln in lines)
    else:
        assert cut > 0 and any("after cancelling requests past the grace period" in ln for ln in lines)
