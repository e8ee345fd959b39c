"""uvicorn serving the OpenAI-compatible app in a thread of the gRPC server's process.

The socket is bound when the :class:`HttpServer` is made (so ``port`` 0 resolves at once and a
taken port fails before anything starts); uvicorn runs on its own event loop in a daemon thread.
TLS uses the same PEM certificate and key as gRPC: uvicorn loads them from files, so they are
written to a private temporary directory that is removed once the server has started.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import Scheduler, TokenizerLike
from server.openai_api.app import build_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (HttpServer.port tells which)
    api_key: str | None = None  # every /v1 and tokenizer call must send "Authorization: Bearer <key>"
    max_body_bytes: int = 4 << 20
    max_n: int = 16  # choices per request


class HttpServer:
    """Bound at construction, ``start()`` serves, ``stop()`` closes (waits for open responses up to
    ``grace`` seconds; by then a drain has finished them). The scheduler's lifetime belongs to the
    caller."""

    def __init__(
        self, scheduler: Scheduler, tokenizer: TokenizerLike, model_name: str, options: HttpOptions, *,
        metrics: Metrics, default_max_tokens: int = 256, tls_cert: bytes | None = None, tls_key: bytes | None = None,
        grace: float = 5.0,
    ) -> None:
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        self.options, self._grace = options, grace
        app = build_app(scheduler, tokenizer, model_name, metrics=metrics, default_max_tokens=default_max_tokens,
                        api_key=options.api_key, max_body_bytes=options.max_body_bytes, max_n=options.max_n)
        family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((options.host.strip("[]"), options.port))
        except OSError as e:
            self._sock.close()
            raise OSError(f"could not bind HTTP {options.host}:{options.port}: {e}") from None
        self.port = self._sock.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        self.url = f"{self.scheme}://{options.host}:{self.port}"
        self._tls_dir = None
        ssl = {}
        if tls_cert:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="jaxinfer-tls-")
            d = Path(self._tls_dir.name)
            for name, data in (("cert.pem", tls_cert), ("key.pem", tls_key)):
                fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ssl = {"ssl_certfile": str(d / "cert.pem"), "ssl_keyfile": str(d / "key.pem")}
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=grace,
                                lifespan="off", **ssl)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> HttpServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                            name="jaxinfer-http", daemon=True)
            self._thread.start()
            end = time.monotonic() + timeout
            while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
                time.sleep(0.01)
            if self._tls_dir is not None:
                self._tls_dir.cleanup()  # loaded by now (or failed to)
            if not self._server.started:
                raise RuntimeError(f"HTTP server on {self.url} did not start")
        return self

    def stop(self, grace: float | None = None) -> None:
        """Close; open responses get ``grace`` seconds (default: the constructor's), 0 drops them."""
        grace = self._grace if grace is None else grace
        if self._thread is not None:
            self._server.should_exit = True
            self._server.force_exit = grace <= 0  # open connections are dropped rather than waited for
            self._thread.join(grace + 5.0)
            self._thread = None
        self._sock.close()
