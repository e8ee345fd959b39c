"""``jaxinfer bench serve``: load a running server and report throughput, latency and goodput.

A sweep runs one load level after another (``--concurrency 1,4,16,32`` or ``--request-rate
2,4,8``), each with the same requests, and writes one JSON document (``--output``) and a PNG
(``--plot``): throughput against latency across the sweep, and the TTFT / inter-token latency
distributions per level.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from functools import partial
from pathlib import Path

from jaxinfer.client import DEFAULT_ADDRESS, InferenceClient, read_token_file
from jaxinfer.commands.common import HelpFormatter, add_command
from jaxinfer.evaluation.openai_client import OpenAIClient
from jaxinfer.evaluation.serving import (
    SLO,
    dataset_requests,
    plot_sweep,
    run_load,
    send,
    summary_table,
    synthetic_requests,
)


def register(sub) -> None:
    p = add_command(sub, "bench", help="benchmarks", description="Benchmarks.",
                    example="jaxinfer bench serve --concurrency 1,4,16 --num-requests 64 -o bench.json")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    s = kinds.add_parser(
        "serve", help="benchmark a running server over gRPC or the OpenAI HTTP API",
        description="Drive a running jaxinfer server with a fixed concurrency or a Poisson request rate and report "
        "request throughput, input/output tokens/s, TTFT, time per output token, inter-token latency and "
        "end-to-end latency (mean, p50/p90/p95/p99), and goodput under SLOs.",
        formatter_class=HelpFormatter,
        epilog="example:\n  jaxinfer bench serve --server 127.0.0.1:50051 --request-rate 2,4,8 --plot sweep.png\n",
    )
    c = s.add_argument_group("server")
    c.add_argument("--protocol", choices=("grpc", "openai"), default="grpc",
                   help="grpc: jaxinfer's Generate; openai: streamed /v1/completions of any OpenAI-compatible server")
    c.add_argument("--server", default=None,
                   help=f"HOST:PORT for grpc, base URL for openai (unset: {DEFAULT_ADDRESS} / http://127.0.0.1:8000)")
    c.add_argument("--model", help="openai: the model to ask for (default: the first of /v1/models)")
    c.add_argument("--auth-token-file", help="file holding the bearer token (the API key for openai)")
    c.add_argument("--tls-ca", help="PEM root certificate(s): connect over TLS")
    c.add_argument("--tls", action="store_true", help="connect over TLS with the system roots")
    c.add_argument("--timeout", type=float, default=600.0, help="deadline of each request, seconds")
    load = s.add_argument_group("load (one level per value: a sweep)")
    load.add_argument("--concurrency", default=None, metavar="N[,N...]",
                      help="requests in flight, e.g. 1,4,16,32 (unset: 1 when no --request-rate)")
    load.add_argument("--request-rate", default=None, metavar="R[,R...]",
                      help="arrivals per second (gamma-distributed gaps, Poisson at burstiness 1); 'inf' = all at once")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: <1 burstier, >1 steadier")
    load.add_argument("--max-concurrency", type=int, help="with --request-rate: cap on requests in flight")
    load.add_argument("--num-requests", type=int, default=64, help="requests per level")
    load.add_argument("--warmup", type=int, default=2, help="requests sent (one at a time) before measuring")
    load.add_argument("--seed", type=int, default=0)
    d = s.add_argument_group("requests")
    d.add_argument("--input-len", type=int, default=128, help="mean prompt tokens (random token ids)")
    d.add_argument("--output-len", type=int, default=64, help="mean output tokens (generated to the end: ignore_eos)")
    d.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]; 0 = fixed lengths")
    d.add_argument("--dataset", metavar="FILE.jsonl",
                   help='prompts instead of random ids: {"prompt": str | "prompt_token_ids": [...], "output_len": int}')
    o = s.add_argument_group("SLOs (goodput = completed requests/s within all given limits)")
    o.add_argument("--slo-ttft-ms", type=float)
    o.add_argument("--slo-tpot-ms", type=float)
    o.add_argument("--slo-e2e-ms", type=float)
    r = s.add_argument_group("output")
    r.add_argument("--output", "-o", metavar="FILE.json", help="write the results here")
    r.add_argument("--plot", metavar="FILE.png", help="write the sweep plot here")
    r.add_argument("--title", default="", help="plot title")
    r.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_serve)


def _levels(text: str | None, kind) -> list:
    if text is None:
        return []
    return [kind(x) for x in str(text).split(",") if x.strip()]


def run_serve(args: argparse.Namespace) -> int:
    concurrencies = _levels(args.concurrency, int)
    rates = _levels(args.request_rate, float)
    if concurrencies and rates:
        raise ValueError("sweep --concurrency or --request-rate, not both (cap a rate sweep with --max-concurrency)")
    if not concurrencies and not rates:
        concurrencies = [1]
    if args.protocol == "openai":
        args.server = args.server or ("https" if args.tls or args.tls_ca else "http") + "://127.0.0.1:8000"
        client = OpenAIClient(args.server, api_key=read_token_file(args.auth_token_file) if args.auth_token_file else None,
                              tls_ca=Path(args.tls_ca).read_bytes() if args.tls_ca else None, timeout=args.timeout,
                              model=args.model)
        send_one = client.send
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    else:
        args.server = args.server or DEFAULT_ADDRESS
        client = InferenceClient.connect(args.server, auth_token_file=args.auth_token_file, tls_ca_file=args.tls_ca,
                                         tls=args.tls, timeout=args.timeout)
        send_one = partial(send, client)
    try:
        info = client.model_info()
        if not args.dataset and not info.vocab_size:
            raise ValueError(f"{args.server} does not report its vocabulary size (no /tokenizer_info): "
                             "give prompts with --dataset")
        if args.dataset:
            requests = dataset_requests(args.dataset, args.num_requests, args.output_len, args.seed)
        else:
            requests = synthetic_requests(args.num_requests, args.input_len, args.output_len,
                                          vocab_size=info.vocab_size, range_ratio=args.range_ratio,
                                          exclude_ids=list(info.eos_token_ids), seed=args.seed)
        for w in requests[: args.warmup]:
            rec = send_one(w)
            if not rec.ok:
                raise ValueError(f"warm-up request failed: {rec.error}")
        slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
        runs, metrics = [], []
        levels = [(c, math.inf, f"c={c}") for c in concurrencies] or [
            (args.max_concurrency, r, f"rate={r:g}") for r in rates
        ]
        for conc, rate, label in levels:
            run = run_load(send_one, requests, concurrency=conc, rate=rate, burstiness=args.burstiness, seed=args.seed,
                           label=label, progress=not args.no_progress)
            runs.append(run)
            metrics.append(run.metrics(slo))
    finally:
        client.close()
    doc = {
        "server": args.server,
        "protocol": args.protocol,
        "model": {"name": info.model, "dtype": info.dtype, "mesh": info.mesh, "slots": info.slots,
                  "max_len": info.max_len, "version": info.version},
        "settings": {
            "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
            "range_ratio": args.range_ratio, "dataset": args.dataset, "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, "warmup": args.warmup, "seed": args.seed,
        },
        "runs": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
    if args.plot:
        title = args.title or f"{info.model} on {args.server}: {args.num_requests} requests/level"
        plot_sweep(runs, metrics, args.plot, title)
    print(summary_table(metrics))
    failed = sum(m["failed"] for m in metrics)
    if failed:
        print(f"{failed} requests failed: {'; '.join(e for m in metrics for e in m['errors'])}", file=sys.stderr)
    return 0
