"""``jaxinfer serve``: load a model, compile every program ahead of time, serve gRPC (and the
OpenAI-compatible HTTP API beside it, on the same scheduler) until SIGTERM.

On SIGTERM / SIGINT: health turns NOT_SERVING, new requests get UNAVAILABLE, requests in
flight finish within ``--grace-period`` (the rest are cancelled), then the process exits 0.
Health: ``""`` and ``jaxinfer.v1.Inference`` are readiness, ``liveness`` is liveness; if the
scheduler loop dies, every name turns NOT_SERVING and the process exits 1 (restart it).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

from jaxinfer import distributed, sharding
from jaxinfer.client import read_token_file
from jaxinfer.commands.common import add_command, add_model_args, engine_from_args
from jaxinfer.metrics import Metrics
from server.app import ModelDescription, ServerOptions, build_server
from server.openai_api.server import HttpOptions

log = logging.getLogger("jaxinfer.serve")

def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "serve",
        help="serve a model over gRPC and an OpenAI-compatible HTTP API (continuous batching, streaming)",
        description="Serve a model over gRPC: jaxinfer.v1.Inference (Generate, Score, Tokenize, Detokenize, "
        "GetModelInfo) plus grpc.health.v1.Health and server reflection, and the OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /ready, /metrics) "
        "on --http-port. Every prefill/decode program is "
        "compiled before the port opens. SIGTERM drains: NOT_SERVING, new requests refused, in-flight ones "
        "finish within --grace-period, exit 0.",
        example="jaxinfer serve --model smollm2-135m-instruct --max-seqs 64 --kv-cache-memory 1GiB --port 50051 --http-port 8000",
    )
    add_model_args(p)
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 or [::] for remote clients)")
    n.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    n.add_argument("--auth-token-file", help="file holding a bearer token that every call must send (health stays open)")
    n.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key): serve over TLS")
    n.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    n.add_argument("--max-message-bytes", type=int, default=4 << 20, help="largest request or response message")
    n.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (same scheduler, limits, auth, metrics; 0: any free port)")
    n.add_argument("--no-http", action="store_true", help="serve gRPC only")
    n.add_argument("--api-key-file", help="file holding the HTTP API key (default: the --auth-token-file token)")
    n.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port (/metrics); off if unset")
    n.add_argument("--metrics-host", help="address of the metrics exporter (default: --host)")
    q = p.add_argument_group("admission")
    q.add_argument("--max-queue-requests", type=int, default=256, help="requests waiting for admission before RESOURCE_EXHAUSTED")
    q.add_argument("--max-queue-tokens", type=int, default=1 << 20, help="prompt tokens waiting before RESOURCE_EXHAUSTED")
    q.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of requests that leave it unset")
    q.add_argument("--max-stop-strings", type=int, default=16, help="stop strings per request")
    q.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        max_queue_requests=args.max_queue_requests,
        max_queue_tokens=args.max_queue_tokens,
        default_max_tokens=args.default_max_tokens,
        max_stop_strings=args.max_stop_strings,
        max_message_bytes=args.max_message_bytes,
        auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
        tls_cert=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        tls_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        grace_period=args.grace_period,
        prefix_cache=not args.no_prefix_cache,
    )
    http = None if args.no_http else HttpOptions(
        host=args.host, port=args.http_port, max_body_bytes=args.max_message_bytes,
        api_key=read_token_file(args.api_key_file) if args.api_key_file else None,
    )

    cluster = distributed.from_args(args)  # None: one process; else jax.distributed is up
    if cluster is not None:  # a converted checkpoint (no conversion races), a mesh over every process
        args.model, args.mesh = str(distributed.checkpoint_dir(args.model)), distributed.mesh_spec(args.mesh)

    t0 = time.perf_counter()
    engine, _ = engine_from_args(args, lazy_compile=False)
    load_s = time.perf_counter() - t0
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer")
    t1 = time.perf_counter()
    # One process: the covering programs run any call, so serving starts once they are compiled and
    # the narrower (faster) ones compile on a background thread. Several processes must run the same
    # program for each call, so they compile every program first.
    first = engine.covering_variants() if cluster is None else engine.variants()
    engine.compile(first, progress=True)
    rest = len(engine.variants()) - engine.programs_compiled
    log.info("start-up: load %.1fs, compile %.1fs (%d programs; %d more compile in the background); "
             "nothing compiles on a request's path", load_s, time.perf_counter() - t1, engine.programs_compiled, rest)
    if cluster is not None and not cluster.is_leader:
        try:
            return distributed.follow(engine)  # serves nothing; returns when process 0 stops the group
        finally:
            distributed.shutdown()
    model = ModelDescription(
        name=engine.name,
        architecture=engine.cfg.family,
        dtype=str(engine.dtype),
        mesh=sharding.describe(engine.mesh) + (f" in {cluster.num_processes} processes" if cluster else ""),
        max_position_embeddings=engine.cfg.max_position_embeddings,
    )
    served = engine if cluster is None else distributed.LockstepEngine(engine)
    metrics = Metrics()
    try:
        server = build_server(served, engine.tokenizer, model, options, metrics=metrics, http=http)
        if args.metrics_port is not None:
            host = metrics_host(args)
            log.info("metrics on http://%s:%d/metrics", host, metrics.serve_http(args.metrics_port, host))
        if cluster is None and rest:
            engine.compile_in_background()
        return serve_until_signal(server)
    finally:
        metrics.close()
        if cluster is not None:
            served.stop()  # the other processes leave their follow loop
            distributed.shutdown()


def metrics_host(args: argparse.Namespace) -> str:
    """The metrics exporter binds where the server binds unless told otherwise."""
    return args.metrics_host or args.host


def serve_until_signal(server, grace: float | None = None, signals=(signal.SIGTERM, signal.SIGINT)) -> int:
    """Start ``server`` (an :class:`server.app.InferenceServer`), log "SERVING on host:port", block
    until one of ``signals``, then drain within ``grace`` seconds. Returns the exit code: 0, or 1
    when the scheduler loop died (health is NOT_SERVING by then; an orchestrator restarts us)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        server.start()
        log.info("SERVING on %s", server.address)
        if getattr(server, "http", None) is not None:
            log.info("SERVING the OpenAI-compatible API on %s/v1", server.http.url)
        while not stop.wait(0.5):
            if not server.alive:
                log.critical("the scheduler loop died (%r): stopping with exit code 1", server.scheduler.died)
                server.stop()
                return 1
        log.info("received %s: draining", signal.Signals(received[0]).name)
        clean = server.drain(grace)
        log.info("shut down %s", "cleanly" if clean else "after cancelling requests past the grace period")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
