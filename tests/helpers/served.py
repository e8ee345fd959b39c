"""An in-process gRPC server (a real grpc.server on a loopback port) over the fake engine, with a
client stub and the checks that it ended idle."""

from __future__ import annotations

import grpc

from jaxinfer.metrics import Metrics
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ModelDescription, ServerOptions, build_server
from tests.helpers import wait_for
from tests.helpers.fakes import FakeDetokenizer, FakeEngine, FakeTokenizer

MODEL = ModelDescription("fake-97", "fake", "float32", "data=1,model=1")


class Served:
    def __init__(self, engine: FakeEngine | None = None, tokenizer: FakeTokenizer | None = None, **options):
        self.engine = engine or FakeEngine()
        opts = dict(max_queue_requests=64, max_queue_tokens=4096, default_max_tokens=8, grace_period=5.0)
        opts.update(options)
        self.server = build_server(
            self.engine, tokenizer or FakeTokenizer(), MODEL, ServerOptions(**opts), metrics=Metrics(),
            detokenizer=FakeDetokenizer,
        ).start()
        self.metrics = self.server.metrics
        self.channel = self.new_channel()
        self.stub = pb_grpc.InferenceStub(self.channel)

    def new_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.server.port}")

    def close(self) -> None:
        self.channel.close()
        self.server.stop()

    def generate(self, **kw) -> tuple[list[pb.GenerateResponse], list[int], str]:
        timeout = kw.pop("timeout", 30)
        metadata = kw.pop("metadata", None)
        resps = list(self.stub.Generate(pb.GenerateRequest(**kw), timeout=timeout, metadata=metadata))
        return resps, [t for r in resps for t in r.token_ids], "".join(r.text for r in resps)

    def idle(self) -> None:
        sched = self.server.scheduler
        wait_for(lambda: sched.load().live_requests == 0)
        load = sched.load()
        assert (load.active_seqs, load.queue_requests, load.queue_tokens) == (0, 0, 0)
        assert self.engine.active_rows() == 0
        started = self.metrics.value("jaxinfer_requests_started_total")
        assert started == sum(self.metrics.finished_by_reason().values())
        assert self.engine.violations == []
