"""An in-process server (gRPC + the OpenAI-compatible HTTP API on loopback ports) over the
HTTP fakes (tests.helpers.http_fakes), with an ``openai`` client and the check that it ended idle."""

from __future__ import annotations

import httpx
import openai

from jaxinfer.metrics import Metrics
from server.app import ModelDescription, ServerOptions, build_server
from server.openai_api.server import HttpOptions
from tests.helpers import wait_for

MODEL = "fake-97"


class Served:
    def __init__(self, fakes, engine=None, tokenizer=None, detokenizer=None, http: dict | None = None, **options):
        self.engine = engine or fakes.Engine()
        opts = dict(max_queue_requests=64, max_queue_tokens=4096, default_max_tokens=8, grace_period=5.0)
        opts.update(options)
        self.server = build_server(
            self.engine, tokenizer or fakes.Tokenizer(), ModelDescription(MODEL), ServerOptions(**opts),
            metrics=Metrics(), detokenizer=detokenizer or fakes.Detokenizer, http=HttpOptions(port=0, **(http or {})),
        ).start()
        self.url = self.server.http.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=(http or {}).get("api_key") or "none",
                                    max_retries=0, timeout=30)
        self.metrics = self.server.metrics

    def post(self, path: str, body, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30, **kw)

    def close(self) -> None:
        self.client.close()
        self.server.stop()

    def idle(self) -> None:
        wait_for(lambda: self.server.scheduler.load().live_requests == 0)
        assert self.engine.active_rows() == 0
