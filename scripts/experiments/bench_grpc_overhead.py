#!/usr/bin/env python3
"""What serving costs on top of the engine, measured in one run on one engine.

1. In-process: the engine's own decode rate for one sequence (prefill, then
   decode steps driven directly), tokens/s after the first token.
2. One gRPC stream against a server on the same engine (loopback): tokens/s
   after the first token, and its ratio to (1).
3. Aggregate tokens/s at 1, 8 and 32 concurrent gRPC streams.

    python -m scripts.experiments.bench_grpc_overhead                  # SmolLM2-135M, 32 slots
    python -m scripts.experiments.bench_grpc_overhead --quick          # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np


def in_process_rate(engine, prompt: list[int], n: int) -> float:
    from jaxinfer.engine.types import SamplingParams

    pages = {0: list(range(-(-(len(prompt) + n + 1) // engine.page_size)))}
    engine.prefill(0, prompt, SamplingParams(), pages=pages[0])
    engine.decode([0], pages).result()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        step = engine.decode([0], pages)
    step.result()
    rate = (n - 1) / (time.perf_counter() - t0)
    engine.release(0)
    return rate


def stream(stub, pb, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds from first to last token, tokens)."""
    req = pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    first = last = None
    count = 0
    for resp in stub.Generate(req, timeout=600):
        if resp.token_ids:
            now = time.perf_counter()
            first = first or now
            last = now
            count += len(resp.token_ids)
    return first - t0, last - first, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per stream")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default="bench_grpc_overhead.json")
    args = p.parse_args(argv)
    if args.quick:
        args.slots, args.tokens, args.concurrency, args.max_len = 4, 16, "1,4", 128

    import grpc
    from tqdm import tqdm

    from jaxinfer.engine.engine import EngineConfig, enable_compilation_cache
    from jaxinfer.loading import build_engine
    from jaxinfer.metrics import Metrics
    from server import jaxinfer_pb2 as pb
    from server import jaxinfer_pb2_grpc as pb_grpc
    from server.app import ModelDescription, ServerOptions, build_server

    enable_compilation_cache()
    engine = build_engine(args.model, EngineConfig(max_seqs=args.slots, max_len=args.max_len))
    engine.compile(progress=False)
    prompt = engine.tokenizer.encode("The history of the printing press begins")
    results: dict = {"model": engine.name, "slots": args.slots, "tokens_per_stream": args.tokens}

    results["in_process_tok_s"] = max(in_process_rate(engine, prompt, args.tokens) for _ in range(2))

    desc = ModelDescription(name=engine.name, architecture=engine.cfg.family, dtype=str(engine.dtype),
                            mesh="1 device", max_position_embeddings=engine.cfg.max_position_embeddings)
    server = build_server(engine, engine.tokenizer, desc, ServerOptions(host="127.0.0.1", port=0),
                          metrics=Metrics()).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.InferenceStub(channel)
        stream(stub, pb, prompt, 4)  # warm the channel
        single = [stream(stub, pb, prompt, args.tokens) for _ in range(2)]
        results["grpc_single_tok_s"] = max((n - 1) / dt for _, dt, n in single)
        results["grpc_single_ttft_ms"] = min(t for t, _, _ in single) * 1e3
        results["grpc_over_in_process"] = results["grpc_single_tok_s"] / results["in_process_tok_s"]
        results["aggregate"] = []
        for c in tqdm([int(x) for x in args.concurrency.split(",")], desc="concurrency", file=sys.stderr):
            outs: list = []
            threads = [threading.Thread(target=lambda: outs.append(stream(stub, pb, prompt, args.tokens)))
                       for _ in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            total = sum(n for _, _, n in outs)
            results["aggregate"].append({"streams": c, "tok_s": total / wall,
                                         "ttft_p50_ms": float(np.median([t for t, _, _ in outs])) * 1e3})
        channel.close()
    finally:
        server.stop()

    print(f"\n{results['model']}: {args.slots} slots, {args.tokens} tokens per stream")
    print(f"in-process decode, 1 sequence   {results['in_process_tok_s']:8.1f} tok/s")
    print(f"one gRPC stream                 {results['grpc_single_tok_s']:8.1f} tok/s  "
          f"({results['grpc_over_in_process'] * 100:.0f}% of in-process; TTFT {results['grpc_single_ttft_ms']:.0f} ms)")
    print("\nconcurrent streams   aggregate tok/s   TTFT p50 ms")
    for r in results["aggregate"]:
        print(f"{r['streams']:18d}   {r['tok_s']:15.1f}   {r['ttft_p50_ms']:11.0f}")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
