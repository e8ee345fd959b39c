#!/usr/bin/env python3
"""What one jitted call costs the host per buffer it passes: the runtime's
fixed cost per argument, read-only and donated, with almost no device work.

A decode call of the unrolled engine passes one buffer per layer weight and per
cache block (~330 for the Llama-3-8B shape on a GPU, ~300 for SmolLM2 on CPU)
and donates the cache blocks. This times, side by side in one run, a program
that takes N read-only buffers and one that takes and donates N buffers (each
a small float32 array; the program touches one element of each), for several
N, and fits the host time per call against N: the slope is the runtime's cost
per buffer, the intercept its cost per call. Multiplied by the engine's buffer
counts it says how much of a decode call's host time the buffers explain.

    python -m scripts.experiments.bench_buffers                  # table
    python -m scripts.experiments.bench_buffers --json buffers.json

Host time is the time the dispatching thread spends in the call (calls issued
back to back, results awaited at the end); per call is the wall time over those
calls, i.e. whichever of host and device is the slower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def time_calls(fn, args, calls: int, repeat: int) -> tuple[float, float]:
    """(host seconds per call, wall seconds per call), best of ``repeat``.
    ``fn(args)`` returns (new args, output); with donation the new args replace
    the donated ones."""
    import jax

    best_host, best_wall = float("inf"), float("inf")
    for _ in range(repeat):
        host, t0 = 0.0, time.perf_counter()
        for _ in range(calls):
            c0 = time.perf_counter()
            args, out = fn(args)
            host += time.perf_counter() - c0
        jax.block_until_ready((args, out))
        best_wall = min(best_wall, (time.perf_counter() - t0) / calls)
        best_host = min(best_host, host / calls)
    return best_host, best_wall


def fit(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against ns."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(ns, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def measure(counts: list[int], elements: int, calls: int, repeat: int) -> dict:
    import jax
    import jax.numpy as jnp

    def read_only(xs):
        return sum(x[0] for x in xs)

    def donated(xs):
        return [x.at[0].add(1.0) for x in xs], xs[0][1]

    ro_jit = jax.jit(read_only)
    don_jit = jax.jit(donated, donate_argnums=0)
    rows = []
    for n in counts:
        xs = [jnp.full((elements,), float(i), jnp.float32) for i in range(n)]
        ro = lambda a: (a, ro_jit(a))
        don = lambda a: don_jit(a)
        jax.block_until_ready(ro(xs))  # compile
        xs, _ = don(xs)
        jax.block_until_ready(xs)
        ro_host, ro_wall = time_calls(ro, xs, calls, repeat)
        don_host, don_wall = time_calls(don, xs, calls, repeat)
        rows.append({"buffers": n, "read_only_host_us": ro_host * 1e6, "read_only_call_us": ro_wall * 1e6,
                     "donated_host_us": don_host * 1e6, "donated_call_us": don_wall * 1e6})
        del xs
    res = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "jax": jax.__version__,
           "elements": elements, "rows": rows}
    for kind in ("read_only", "donated"):
        for what in ("host", "call"):
            slope, icpt = fit(counts, [r[f"{kind}_{what}_us"] for r in rows])
            res[f"{kind}_{what}_us_per_buffer"] = slope
            res[f"{kind}_{what}_us_fixed"] = icpt
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,16,64,128,256,384", help="buffer counts to time")
    p.add_argument("--elements", type=int, default=1024, help="float32 elements per buffer")
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    p.add_argument("--repeat", type=int, default=5, help="timings per case (best kept)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if len(counts) < 2 or min(counts) < 1:
        p.error(f"--counts needs at least two positive counts, got {args.counts!r}")

    res = measure(counts, args.elements, args.calls, args.repeat)
    print(f"backend {res['backend']} ({res['device']}), jax {res['jax']}, {args.elements} float32 per buffer")
    print("| buffers | read-only host us | read-only per call us | donated host us | donated per call us |")
    print("| --- | --- | --- | --- | --- |")
    for r in res["rows"]:
        print(f"| {r['buffers']} | {r['read_only_host_us']:.1f} | {r['read_only_call_us']:.1f} | "
              f"{r['donated_host_us']:.1f} | {r['donated_call_us']:.1f} |")
    for kind, label in (("read_only", "read-only"), ("donated", "donated")):
        print(f"{label}: host {res[f'{kind}_host_us_per_buffer']:.2f} us per buffer + "
              f"{res[f'{kind}_host_us_fixed']:.1f} us per call; wall {res[f'{kind}_call_us_per_buffer']:.2f} us "
              f"per buffer + {res[f'{kind}_call_us_fixed']:.1f} us per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
