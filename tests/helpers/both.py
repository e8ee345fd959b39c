"""Both front ends (gRPC and the OpenAI-compatible HTTP API) on one scheduler over the HTTP fake
engine (tests/helpers/http_fakes.py: vocab 97, printable ASCII, max_len 64), with small limits so
that every limit can be hit, and the check that a good request is still served afterwards."""

from __future__ import annotations

import json

import grpc
import httpx

from jaxinfer.metrics import Metrics
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ModelDescription, ServerOptions, build_server
from server.openai_api.server import HttpOptions
from tests.helpers import wait_for
from tests.helpers.http_fakes import HttpFakeDetokenizer, HttpFakeEngine, HttpFakeTokenizer

MODEL = "fake-97"
LIMITS = dict(max_stop_strings=4, max_stop_length=8, max_message_bytes=64 << 10, max_queue_requests=2,
              max_queue_tokens=4096, default_max_tokens=4, grace_period=5.0)


class Both:
    """One scheduler behind gRPC and HTTP."""

    def __init__(self, tokenizer=None, token: str | None = None, **options) -> None:
        self.engine = HttpFakeEngine()
        self.server = build_server(
            self.engine, tokenizer or HttpFakeTokenizer(), ModelDescription(MODEL), ServerOptions(**{**LIMITS, **options},
            auth_token=token), metrics=Metrics(), detokenizer=HttpFakeDetokenizer,
            http=HttpOptions(port=0, max_body_bytes=LIMITS["max_message_bytes"], max_n=4),
        ).start()
        self.url = self.server.http.url
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)

    def grpc(self, metadata=None, **fields) -> grpc.RpcError | list[pb.GenerateResponse]:
        try:
            return list(self.stub.Generate(pb.GenerateRequest(**fields), timeout=10, metadata=metadata))
        except grpc.RpcError as e:
            return e

    def http(self, path: str = "/v1/completions", body=None, headers=None, content: bytes | None = None) -> httpx.Response:
        # json.dumps writes NaN / Infinity (which Python's and FastAPI's JSON readers accept); httpx would refuse
        content = json.dumps(body).encode() if content is None else content
        return httpx.post(self.url + path, content=content, timeout=10,
                          headers={"content-type": "application/json", **(headers or {})})

    def serves_a_good_request(self, headers=None, metadata=None) -> None:
        out = self.grpc(prompt="ab", max_tokens=3, metadata=metadata)
        assert not isinstance(out, grpc.RpcError), out
        assert out[-1].finish_reason == "length"
        r = self.http(body={"model": MODEL, "prompt": "ab", "max_tokens": 3, "temperature": 0}, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cde", r.text
        self.idle()

    def close(self) -> None:
        self.channel.close()
        self.server.stop()

    def idle(self) -> None:
        wait_for(lambda: self.server.scheduler.load().live_requests == 0)
        load = self.server.scheduler.load()
        assert (load.active_seqs, load.queue_requests) == (0, 0)
        assert self.engine.active_rows() == 0
