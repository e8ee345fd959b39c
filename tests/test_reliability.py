"""Liveness vs readiness, a dying scheduler loop, the metrics exporter's address, and deadlines that
end a request within one engine call: over the hand-computable fake engines (tests/helpers)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.cli import build_parser
from jaxinfer.commands.serve import metrics_host, serve_until_signal
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import Request, Scheduler, SchedulerLimits
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import LIVENESS, SERVICE, ServerOptions, build_server
from server.openai_api.server import HttpOptions
from tests.helpers import wait_for
from tests.helpers.fakes import FakeDetokenizer, FakeEngine, FakeTokenizer
from tests.helpers.served import MODEL, Served
from tests.helpers.http_served import Served as HttpServed

ROOT = Path(__file__).resolve().parents[1]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _status(served: Served, name: str) -> int:
    health = health_pb2_grpc.HealthStub(served.channel)
    return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def _kill_loop(scheduler) -> None:
    """An exception escaping the loop itself (not one iteration): the wait for work raises."""
    def boom():
        raise RuntimeError("injected: scheduler loop broken")
    scheduler._has_work = boom
    scheduler._wake()


def test_liveness_stays_serving_while_draining_readiness_does_not():
    s = Served()
    eng = s.engine
    try:
        assert [_status(s, n) for n in ("", SERVICE, LIVENESS)] == [SERVING] * 3
        eng.gate = threading.Event()  # hold a request in flight so the drain lasts
        stream = s.server.scheduler.submit(Request((1, 2), 3))
        wait_for(lambda: eng.active_rows() == 1)
        drain = threading.Thread(target=s.server.drain, args=(10.0,))
        drain.start()
        wait_for(lambda: _status(s, "") == NOT_SERVING)
        assert _status(s, SERVICE) == NOT_SERVING
        assert _status(s, LIVENESS) == SERVING  # draining is not dying: do not restart it
        eng.gate.set()
        drain.join(15)
        assert list(stream)[-1].finish_reason == "length"
    finally:
        if eng.gate is not None:
            eng.gate.set()
        s.close()


def test_a_dead_scheduler_loop_turns_every_health_name_not_serving_and_fails_requests():
    s = Served()
    try:
        eng = s.engine
        eng.gate = threading.Event()
        stream = s.server.scheduler.submit(Request((1, 2), 3))
        wait_for(lambda: eng.active_rows() == 1)
        _kill_loop(s.server.scheduler)
        eng.gate.set()
        wait_for(lambda: _status(s, LIVENESS) == NOT_SERVING)
        assert _status(s, "") == NOT_SERVING and _status(s, SERVICE) == NOT_SERVING
        assert not s.server.alive and isinstance(s.server.scheduler.died, RuntimeError)
        assert list(stream)[-1].finish_reason in ("cancelled", "error")  # never a hang
        assert s.engine.active_rows() == 0
    finally:
        s.close()


def test_http_health_is_liveness_and_ready_is_readiness_on_the_same_scheduler(http_fakes):
    server = build_server(
        http_fakes.Engine(), http_fakes.Tokenizer(), MODEL, ServerOptions(grace_period=5.0), metrics=Metrics(),
        detokenizer=http_fakes.Detokenizer, http=HttpOptions(port=0),
    ).start()
    try:
        url = server.http.url
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
        _kill_loop(server.scheduler)
        wait_for(lambda: not server.alive)
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.get(url + "/ready").status_code == 503
    finally:
        server.stop()


def test_serve_until_signal_exits_non_zero_when_the_scheduler_loop_dies():
    server = build_server(
        FakeEngine(), FakeTokenizer(), MODEL, ServerOptions(port=0, grace_period=1.0), metrics=Metrics(),
        detokenizer=FakeDetokenizer,
    )

    def kill_soon():
        wait_for(lambda: server.scheduler.running)
        _kill_loop(server.scheduler)

    threading.Thread(target=kill_soon, daemon=True).start()
    t0 = time.monotonic()
    assert serve_until_signal(server) == 1
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "argv, expected",
    [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0"), (["--host", "10.1.2.3", "--metrics-host", "::1"], "::1")],
)
def test_the_metrics_exporter_binds_where_the_server_binds_unless_told(argv, expected):
    args = build_parser().parse_args(["serve", "--model", "m", *argv])
    assert metrics_host(args) == expected


class SlowFakeEngine(FakeEngine):
    """Each prefill and score piece takes ``piece_s``: a long prompt or score job keeps one loop
    iteration busy for many pieces."""

    def __init__(self, piece_s: float, **kw) -> None:
        super().__init__(**kw)
        self.piece_s = piece_s

    def prefill(self, *a, **kw):
        time.sleep(self.piece_s)
        return super().prefill(*a, **kw)

    def score(self, *a, **kw):
        time.sleep(self.piece_s)
        return super().score(*a, **kw)

    def pieces(self, kind: str) -> int:
        return sum(c[0] == kind for c in self.calls)


def test_a_deadline_ends_a_long_prefill_within_one_engine_call():
    eng = SlowFakeEngine(0.1, max_len=128, prefill_chunk=8)
    # one iteration may prefill the whole 96-token prompt: 12 pieces of 0.1 s
    sched = Scheduler(eng, FakeTokenizer(), SchedulerLimits(prefill_budget=128), detokenizer=FakeDetokenizer).start()
    try:
        t0 = time.monotonic()
        stream = sched.submit(Request(tuple(range(1, 97)), 4, deadline=t0 + 0.25))
        events = list(stream)
        assert events[-1].finish_reason == "deadline"
        assert eng.pieces("prefill") <= 4  # the deadline waits for at most the piece in flight
        assert time.monotonic() - t0 < 0.6
        wait_for(lambda: eng.active_rows() == 0)
        assert list(sched.submit(Request((1, 2), 2)))[-1].finish_reason == "length"  # still serving
    finally:
        sched.close()


def test_a_score_job_past_its_deadline_stops_at_its_next_piece():
    eng = SlowFakeEngine(0.1, max_len=128, prefill_chunk=8)
    sched = Scheduler(eng, FakeTokenizer(), SchedulerLimits(prefill_budget=128), detokenizer=FakeDetokenizer).start()
    try:
        with pytest.raises(TimeoutError):
            sched.score(tuple(range(1, 90)), (90, 91), timeout=0.25)
        time.sleep(0.3)  # had the job gone on, its 12 pieces would still be running
        assert eng.pieces("score") <= 4
        wait_for(lambda: sched.load().queue_requests == 0)
        assert sched.score((1, 2, 3), (4,)).is_greedy  # and the loop scores the next one
    finally:
        sched.close()


# -- the seed of a sampled request: picked on the host, returned, reproducible ----------------------


def test_grpc_returns_the_seed_of_an_unseeded_sampled_request_and_it_reproduces_the_output(http_fakes):
    s = HttpServed(http_fakes)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)

            def run(**kw):
                resps = list(stub.Generate(pb.GenerateRequest(prompt="abc", max_tokens=6, ignore_eos=True, **kw), timeout=10))
                return resps[-1], "".join(r.text for r in resps)

            seeds, texts = set(), set()
            for _ in range(4):
                last, text = run(temperature=1.0)
                assert last.HasField("seed")
                seeds.add(last.seed)
                texts.add(text)
                again, text2 = run(temperature=1.0, seed=last.seed)
                assert again.seed == last.seed and text2 == text  # the seed reproduces the output
            assert len(seeds) == 4 and len(texts) > 1  # a fresh seed each: not the same "random" text
            greedy, _ = run(temperature=0.0)
            assert not greedy.HasField("seed")
    finally:
        s.close()


def test_http_choices_carry_their_seed_streamed_or_not(http_fakes):
    s = HttpServed(http_fakes)
    try:
        body = {"model": "fake-97", "prompt": "abc", "max_tokens": 6, "temperature": 1.0, "n": 3, "ignore_eos": True}
        out = s.post("/v1/completions", body).json()
        seeds = [c["seed"] for c in out["choices"]]
        assert len(set(seeds)) == 3
        for c in out["choices"]:
            one = s.post("/v1/completions", {**body, "n": 1, "seed": c["seed"]}).json()["choices"][0]
            assert one["text"] == c["text"] and one["seed"] == c["seed"]
        given = s.post("/v1/completions", {**body, "seed": 7}).json()
        assert [c["seed"] for c in given["choices"]] == [7, 8, 9]
        chat = s.client.chat.completions.create(model="fake-97", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0.8, stream=True)
        finals = [c.choices[0] for c in chat if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and isinstance(finals[0].model_extra.get("seed"), int)
        greedy = s.post("/v1/completions", {**body, "temperature": 0, "n": 1}).json()["choices"][0]
        assert "seed" not in greedy
    finally:
        s.close()


def test_the_kubernetes_liveness_probe_asks_the_liveness_service_and_readiness_the_readiness_one():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "replicas.yaml").read_text()) if d]
    (pod,) = [d["spec"]["template"]["spec"] for d in docs if d.get("kind") == "Deployment"]
    (container,) = [c for c in pod["containers"] if "livenessProbe" in c]
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
