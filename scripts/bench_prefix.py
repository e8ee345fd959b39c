#!/usr/bin/env python3
"""Shared-prefix and memory benchmark of the paged engine, through the scheduler, in one run.

  (a) shared prefix: N requests sharing a P-token system prompt + S-token unique suffixes,
      O output tokens each, all queued at once: TTFT p50/p95 with prefix caching and without,
      on the same engine (target: with <= 20% of without);
  (b) memory: with the pool of --pool-tokens (default 16,384 tokens: the CPU default of 720 MiB
      for SmolLM2 in float32), N concurrent requests of ~128 prompt + 64 output tokens: all
      streaming at once (peak decode rows == N), no rejection, no preemption;
  (c) a pool too small for (b)'s load (--small-pool-tokens): preemption keeps every request
      alive and each greedy output equals (b)'s.

Prints a table and writes JSON (for docs/performance.md).

    python scripts/bench_prefix.py                           # SmolLM2-135M float32, full sizes
    python scripts/bench_prefix.py --tiny --quick            # a random 2-layer Llama, small sizes

Absolute times on a shared CPU are noisy; the ratios measured in the same run hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxinfer.engine.types import SamplingParams  # noqa: E402
from jaxinfer.metrics import Metrics  # noqa: E402
from jaxinfer.scheduler import Request, Scheduler, SchedulerLimits  # noqa: E402


class _NoText:
    """Detokenizer stand-in: the benchmark compares token ids, not text."""

    def __init__(self, tokenizer) -> None:
        pass

    def add(self, ids) -> str:
        return ""

    def flush(self) -> str:
        return ""


class _Tok:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.eos_ids = vocab_size, ()


def build_engine(args, pool_tokens: int, max_len: int):
    import dataclasses

    import jax.numpy as jnp

    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import Engine, enable_compilation_cache
    from jaxinfer.engine.pages import KVPool

    enable_compilation_cache()
    if args.tiny:
        from jaxinfer.config import SMOLLM2_135M
        from jaxinfer.model.transformer import Transformer
        from jaxinfer.model.weights import nest, random_weights

        cfg = dataclasses.replace(SMOLLM2_135M, name="llama-tiny", num_layers=2, hidden_size=128,
                                  intermediate_size=256, vocab_size=2048, head_dim=32, max_position_embeddings=4096)
        model = Transformer(cfg, params=nest({k: jnp.asarray(v) for k, v in random_weights(cfg, seed=0, scale=0.1).items()}))
        make = lambda config: Engine(model, config)  # noqa: E731
    else:
        from jaxinfer.checkpoint import load_checkpoint, resolve_model
        from jaxinfer.model.transformer import Transformer

        ckpt = load_checkpoint(resolve_model(args.model, dtype="float32"), dtype="float32")
        cfg = ckpt.config
        make = lambda config: Engine(Transformer(cfg, params=ckpt.params), config, name=cfg.name)  # noqa: E731
    per_token = KVPool.bytes_per_token(cfg, jnp.float32)
    config = EngineConfig(max_seqs=args.max_seqs, max_len=max_len, page_size=args.page_size,
                          kv_cache_bytes=pool_tokens * per_token, lazy_compile=True)
    engine = make(config)
    t0 = time.perf_counter()
    # every program a greedy request can pick, compiled before any timing (nothing compiles on a
    # request's path): the variants whose last field (greedy_only) is not False, scoring left out
    engine.compile([v for v in engine.variants() if v[0] != "score" and v[-1] is not False], progress=False)
    print(f"# {engine.describe()} (compiled in {time.perf_counter() - t0:.1f}s)", flush=True)
    return engine


def run_requests(engine, reqs: list[Request], *, prefix_cache: bool, vocab_size: int) -> dict:
    """Queue every request at once; collect tokens, TTFTs, peak concurrency and page metrics."""
    metrics = Metrics()
    limits = SchedulerLimits(max_queue_requests=len(reqs) + 1, max_queue_tokens=1 << 40, prefix_cache=prefix_cache)
    s = Scheduler(engine, _Tok(vocab_size), limits, metrics=metrics, detokenizer=_NoText).start()
    peak = {"seqs": 0, "pages": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            peak["seqs"] = max(peak["seqs"], s.load().active_seqs)
            peak["pages"] = max(peak["pages"], int(metrics.value("jaxinfer_kv_pages", {"state": "used"})))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        streams = [s.submit(r) for r in reqs]
        outs, lasts = [], []
        for st in streams:
            events = list(st)
            outs.append([t for e in events for t in e.token_ids])
            lasts.append(events[-1])
        wall = time.perf_counter() - t0
    finally:
        done.set()
        watcher.join()
        s.close()
    ttft = sorted(e.timings.ttft_s for e in lasts if e.timings.ttft_s is not None)
    generated = sum(len(o) for o in outs)
    return {
        "prefix_cache": prefix_cache,
        "requests": len(reqs),
        "finished": {r: sum(e.finish_reason == r for e in lasts) for r in {e.finish_reason for e in lasts}},
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else None,
        "wall_s": wall,
        "output_tokens_per_s": generated / wall,
        "cached_prompt_tokens": sum(e.usage.cached_tokens for e in lasts),
        "prompt_tokens": sum(e.usage.prompt_tokens for e in lasts),
        "preemptions": int(metrics.value("jaxinfer_preemptions_total")),
        "rejected": int(sum(metrics.value("jaxinfer_requests_rejected_total", {"cause": c})
                            for c in ("invalid", "queue_full", "unavailable"))),
        "peak_active_seqs": peak["seqs"],
        "peak_pages_used": peak["pages"],
        "outputs": outs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of --model (fast)")
    p.add_argument("--quick", action="store_true", help="16 requests, 256-token prefix, 16 outputs (a smoke run)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix", type=int, default=1024, help="shared system prompt tokens")
    p.add_argument("--suffix", type=int, default=32, help="unique tokens per request")
    p.add_argument("--output", type=int, default=64, help="output tokens per request")
    p.add_argument("--memory-prompt", type=int, default=128)
    p.add_argument("--pool-tokens", type=int, default=16384)
    p.add_argument("--small-pool-tokens", type=int, default=4096)
    p.add_argument("--max-seqs", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--parts", default="prefix,memory,preempt")
    p.add_argument("--json", default="bench_prefix.json")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prefix, args.output, args.memory_prompt = 16, 256, 16, 64
        args.max_seqs = min(args.max_seqs, 16)
        args.pool_tokens, args.small_pool_tokens = min(args.pool_tokens, 4096), min(args.small_pool_tokens, 512)
    parts = set(args.parts.split(","))
    rng = random.Random(0)
    # a multiple of 128: the engine clips its prefill buckets to max_len and scores in chunks of 128
    max_len = -(-(args.prefix + args.suffix + args.output + 8) // 128) * 128
    engine = build_engine(args, args.pool_tokens, max_len)
    V = engine.cfg.vocab_size
    greedy = SamplingParams()
    report: dict = {
        "model": "random 2-layer Llama (--tiny)" if args.tiny else args.model,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "engine": engine.describe(),
        "args": vars(args),
    }

    if "prefix" in parts:
        system = tuple(rng.randrange(100, V) for _ in range(args.prefix))
        reqs = [Request(system + tuple(rng.randrange(100, V) for _ in range(args.suffix)), args.output, greedy,
                        ignore_eos=True) for _ in range(args.requests)]
        off = run_requests(engine, reqs, prefix_cache=False, vocab_size=V)
        on = run_requests(engine, reqs, prefix_cache=True, vocab_size=V)
        same = off["outputs"] == on["outputs"]
        report["shared_prefix"] = {
            "without": {k: v for k, v in off.items() if k != "outputs"},
            "with": {k: v for k, v in on.items() if k != "outputs"},
            "ttft_p50_ratio": on["ttft_p50_s"] / off["ttft_p50_s"],
            "greedy_outputs_equal": same,
            "target": "ttft_p50_ratio <= 0.20",
        }
        Path(args.json).write_text(json.dumps(report, indent=2))  # each part as soon as it is measured

    if parts & {"memory", "preempt"}:
        reqs = [Request(tuple(rng.randrange(100, V) for _ in range(args.memory_prompt + rng.randrange(-8, 9))),
                        args.output, greedy, ignore_eos=True) for _ in range(args.requests)]
        big = run_requests(engine, reqs, prefix_cache=True, vocab_size=V)
        report["memory"] = {k: v for k, v in big.items() if k != "outputs"}
        report["memory"]["pool_tokens"] = engine.num_pages * engine.page_size
        report["memory"]["target"] = f"peak_active_seqs == {args.requests}, preemptions == 0, rejected == 0"
        Path(args.json).write_text(json.dumps(report, indent=2))
        if "preempt" in parts:
            small_engine = build_engine(args, args.small_pool_tokens, max_len=min(max_len, args.small_pool_tokens))
            small = run_requests(small_engine, reqs, prefix_cache=True, vocab_size=V)
            report["small_pool"] = {k: v for k, v in small.items() if k != "outputs"}
            report["small_pool"]["pool_tokens"] = small_engine.num_pages * small_engine.page_size
            report["small_pool"]["greedy_outputs_equal_big_pool"] = small["outputs"] == big["outputs"]
            report["small_pool"]["target"] = "every request finishes (length), preemptions > 0, outputs equal"

    Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"# wrote {args.json}")
    return 0


def print_table(r: dict) -> None:
    print(f"# {r['model']}")
    if "shared_prefix" in r:
        sp = r["shared_prefix"]
        a = r["args"]
        print(f"\nshared prefix: {a['requests']} requests x ({a['prefix']} shared + {a['suffix']} unique) prompt, "
              f"{a['output']} output tokens")
        print(f"{'prefix cache':>12} {'TTFT p50 s':>11} {'TTFT p95 s':>11} {'wall s':>8} {'out tok/s':>10} "
              f"{'cached tok':>11} {'preempt':>8}")
        for name in ("without", "with"):
            x = sp[name]
            print(f"{name:>12} {x['ttft_p50_s']:>11.3f} {x['ttft_p95_s']:>11.3f} {x['wall_s']:>8.2f} "
                  f"{x['output_tokens_per_s']:>10.1f} {x['cached_prompt_tokens']:>11} {x['preemptions']:>8}")
        print(f"TTFT p50 with / without: {sp['ttft_p50_ratio']:.3f} (target <= 0.20); greedy outputs equal: "
              f"{sp['greedy_outputs_equal']}")
    for key, title in (("memory", "memory"), ("small_pool", "pool too small")):
        if key in r:
            x = r[key]
            print(f"\n{title}: pool {x['pool_tokens']} tokens, {x['requests']} requests: peak decode rows "
                  f"{x['peak_active_seqs']}, peak pages {x['peak_pages_used']}, preemptions {x['preemptions']}, "
                  f"rejected {x['rejected']}, finished {x['finished']}, {x['output_tokens_per_s']:.1f} out tok/s, "
                  f"wall {x['wall_s']:.1f}s"
                  + (f", greedy outputs equal the big pool's: {x['greedy_outputs_equal_big_pool']}"
                     if "greedy_outputs_equal_big_pool" in x else ""))


if __name__ == "__main__":
    sys.exit(main())
