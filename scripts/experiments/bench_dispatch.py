"""Where a decode step's time goes at batch 1: host time to dispatch one call
against the time per step, for calls dispatched back to back (pipelined) and
awaited one by one. Run it once per XLA_FLAGS setting to compare them, e.g.
on a GPU with and without command buffers (CUDA graphs):

    python -m scripts.experiments.bench_dispatch --preset llama3-8b-shape --dtype bfloat16
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m scripts.experiments.bench_dispatch ...

With --lock FILE several copies may compile side by side and take turns to
time (each holds the lock while it times). Prints one line and appends a JSON
row to --json.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np

class _Lock:
    def __init__(self, path: str):
        self.f = open(path, "a")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", help="random weights of this preset shape")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--context", type=int, default=256, help="prompt length before the timed steps")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    p.add_argument("--slots", type=int, default=1, help="cache slots (the step decodes slot 0 alone)")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: twice the context, >= 512)")
    p.add_argument("--label", default=os.environ.get("XLA_FLAGS", "") or "default flags")
    p.add_argument("--lock", default=None, help="take this file lock while timing")
    p.add_argument("--json", default="bench_dispatch.json", help="append the result row here")
    args = p.parse_args(argv)

    import jax

    from scripts.bench_engine import random_checkpoint
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.types import SamplingParams
    from jaxinfer.model.transformer import Transformer
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh(None)
    ckpt = random_checkpoint(args.preset, args.dtype, mesh)
    max_len = args.max_len or 1 << (2 * max(256, args.context + args.steps) - 1).bit_length()
    chunk = 1 << (args.context - 1).bit_length()
    eng = Engine(Transformer(ckpt.config, params=ckpt.params),
                 EngineConfig(slots=args.slots, max_len=max_len, prefill_buckets=(chunk,), decode_rows=(1,), lazy_compile=True),
                 mesh=mesh)
    prompt = [int(t) for t in np.random.default_rng(0).integers(10, 1000, args.context)]

    def fresh():
        eng.release(0)
        eng.prefill(0, prompt, SamplingParams())

    fresh()
    eng.decode([0]).result()  # compile and warm
    row = {"label": args.label, "backend": jax.default_backend(), "preset": args.preset, "context": args.context}
    # the buffers one decode call passes: weights (read-only) and the state it donates
    _, span = eng.last_decode_variant
    row["read_only_buffers"] = len(jax.tree.leaves(eng.params))
    row["donated_buffers"] = len(jax.tree.leaves(eng._head(eng.state, span)))
    with _Lock(args.lock) if args.lock else nullcontext():
        for mode in ("pipelined", "awaited", "pipelined", "awaited"):
            fresh()
            host, t0 = 0.0, time.perf_counter()
            for _ in range(args.steps):
                c0 = time.perf_counter()
                h = eng.decode([0])
                host += time.perf_counter() - c0
                if mode == "awaited":
                    h.result()
            h.result()
            total = time.perf_counter() - t0
            row[f"{mode}_ms"] = min(row.get(f"{mode}_ms", 1e9), total / args.steps * 1e3)
            row[f"{mode}_host_ms"] = min(row.get(f"{mode}_host_ms", 1e9), host / args.steps * 1e3)
    print(f"{args.label:>40}: step {row['pipelined_ms']:.2f} ms pipelined (host {row['pipelined_host_ms']:.2f} ms "
          f"per call), {row['awaited_ms']:.2f} ms awaited (host {row['awaited_host_ms']:.2f}); buffers per call: "
          f"{row['read_only_buffers']} read-only, {row['donated_buffers']} donated", flush=True)
    with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
