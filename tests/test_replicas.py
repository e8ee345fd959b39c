"""Replicas: independent servers behind a standard gRPC load balancer.

The client balances by itself, as docs/multihost.md shows: gRPC's round_robin policy over every
replica's address with client-side health checking (grpc.health.v1 Watch on jaxinfer.v1.Inference)
and a retry policy for UNAVAILABLE. The service config used here is read from that document, so
the example users copy is the one tested. Here the addresses come from an ``ipv4:`` target
(several ports on one machine); in Kubernetes they come from DNS (a headless Service).

Each replica is an in-process server over the scheduler's hand-computable fake engine.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.metrics import Metrics
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import SERVICE, ModelDescription, ServerOptions, build_server
from tests.helpers.fakes import FakeDetokenizer, FakeEngine, FakeTokenizer, expected

DOC = Path(__file__).resolve().parents[1] / "docs" / "multihost.md"


def doc_service_config() -> dict:
    """The JSON block that follows ``<!-- service-config -->`` in docs/multihost.md."""
    m = re.search(r"<!-- service-config -->\s*```json\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"{DOC} has no service-config block"
    return json.loads(m.group(1))


class Replica:
    def __init__(self, step_delay: float = 0.0) -> None:
        self.engine = FakeEngine(step_delay=step_delay)
        self.server = build_server(
            self.engine, FakeTokenizer(), ModelDescription("fake"), ServerOptions(grace_period=10.0),
            metrics=Metrics(), detokenizer=FakeDetokenizer,
        ).start()
        self.address = f"127.0.0.1:{self.server.port}"

    def served(self) -> int:
        return int(self.server.metrics.value("jaxinfer_requests_started_total"))

    def refused(self) -> int:
        return int(self.server.metrics.value("jaxinfer_requests_rejected_total", {"cause": "unavailable"}))

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


@pytest.fixture
def replicas(request):
    made: list[Replica] = []

    def make(n: int, **kw) -> list[Replica]:
        made.extend(Replica(**kw) for _ in range(n))
        return made[-n:]

    yield make
    for r in made:
        r.server.stop()


def balanced_channel(reps: list[Replica], config: dict) -> grpc.Channel:
    target = "ipv4:" + ",".join(r.address for r in reps)
    return grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(config))])


def generate(stub, prompt=(10, 11), n=3, **kw) -> list[int]:
    resps = stub.Generate(pb.GenerateRequest(prompt_token_ids=list(prompt), max_tokens=n, **kw), timeout=30)
    ids = [t for r in resps for t in r.token_ids]
    assert ids == expected(list(prompt), n)
    return ids


def until_all_served(stub, reps: list[Replica], limit: int = 200) -> None:
    """Subchannels connect and pass their first health check one by one."""
    for _ in range(limit):
        if all(r.served() for r in reps):
            return
        generate(stub)
    raise AssertionError(f"not every replica got a request: {[r.served() for r in reps]}")


def test_service_config_in_the_docs_is_round_robin_with_health_checks_and_retries():
    cfg = doc_service_config()
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["healthCheckConfig"] == {"serviceName": SERVICE}
    (method,) = cfg["methodConfig"]
    assert method["name"] == [{"service": SERVICE}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_round_robin_spreads_requests_and_health_decides_the_rotation(replicas):
    reps = replicas(3)
    with balanced_channel(reps, doc_service_config()) as ch:
        stub = pb_grpc.InferenceStub(ch)
        until_all_served(stub, reps)
        before = [r.served() for r in reps]
        for _ in range(30):
            generate(stub)
        spread = [r.served() - b for r, b in zip(reps, before)]
        assert sum(spread) == 30 and all(8 <= s <= 12 for s in spread), spread  # round robin: 10 each

        reps[0].server.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)  # out of rotation
        time.sleep(0.5)  # the client's health watch sees it
        before = [r.served() for r in reps]
        for _ in range(20):
            generate(stub)
        spread = [r.served() - b for r, b in zip(reps, before)]
        assert spread[0] == 0 and sum(spread) == 20 and min(spread[1:]) >= 8, spread

        reps[0].server.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)  # back in
        time.sleep(0.5)
        before = reps[0].served()
        for _ in range(30):
            generate(stub)
        assert reps[0].served() - before >= 8


def test_a_draining_replica_leaves_the_rotation_and_finishes_its_requests(replicas):
    """SIGTERM's drain: NOT_SERVING at once, new requests go to the others (never refused by the
    draining one), the request in flight on it runs to its end, then it stops."""
    slow, other = replicas(1, step_delay=0.05)[0], replicas(1)[0]
    with balanced_channel([slow, other], doc_service_config()) as ch:
        stub = pb_grpc.InferenceStub(ch)
        until_all_served(stub, [slow, other])

        in_flight: list = []
        first = threading.Event()

        def long_request():  # ~40 steps of 50 ms on the replica about to drain
            with grpc.insecure_channel(slow.address) as direct:
                for r in pb_grpc.InferenceStub(direct).Generate(
                    pb.GenerateRequest(prompt_token_ids=[20], max_tokens=40), timeout=30
                ):
                    in_flight.append(r)
                    first.set()

        t_req = threading.Thread(target=long_request)
        t_req.start()
        assert first.wait(10)
        drained: list[bool] = []
        t_drain = threading.Thread(target=lambda: drained.append(slow.server.drain(10.0)))
        t_drain.start()
        deadline = time.monotonic() + 5
        while slow.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # the client's health watch sees it

        before_slow, before_other = slow.served(), other.served()
        for _ in range(20):
            generate(stub)
        assert slow.served() == before_slow and other.served() == before_other + 20
        assert slow.refused() == 0  # out of rotation, not refused-and-retried
        assert t_drain.is_alive()  # still draining: the long request is still running

        t_req.join(30)
        t_drain.join(30)
        assert drained == [True]  # the drain finished cleanly
        assert in_flight[-1].finish_reason == "length"
        assert [t for r in in_flight for t in r.token_ids] == expected([20], 40)
        for _ in range(5):  # the stopped replica's address stays in the list; nothing breaks
            generate(stub)


def test_the_retry_policy_covers_clients_without_health_checks(replicas):
    """Without healthCheckConfig (or before a client's health watch notices), requests sent to a
    draining replica are refused with UNAVAILABLE, before any response: the retry policy sends
    them to another replica, so the client sees no error."""
    slow, other = replicas(1, step_delay=0.05)[0], replicas(1)[0]
    config = copy.deepcopy(doc_service_config())
    del config["healthCheckConfig"]
    with balanced_channel([slow, other], config) as ch:
        stub = pb_grpc.InferenceStub(ch)
        until_all_served(stub, [slow, other])
        first = threading.Event()

        def long_request():
            with grpc.insecure_channel(slow.address) as direct:
                for _ in pb_grpc.InferenceStub(direct).Generate(
                    pb.GenerateRequest(prompt_token_ids=[20], max_tokens=40), timeout=30
                ):
                    first.set()

        t_req = threading.Thread(target=long_request)
        t_req.start()
        assert first.wait(10)
        t_drain = threading.Thread(target=slow.server.drain, args=(10.0,))
        t_drain.start()
        while slow.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
            time.sleep(0.01)
        for _ in range(10):
            generate(stub)  # never raises
        assert slow.refused() >= 3  # round robin kept sending it requests; each was retried elsewhere
        t_req.join(30)
        t_drain.join(30)
