#!/usr/bin/env python3
"""On-device sampling side by side: the engine's sampler (candidates, two-level
draw, bisection only where needed) against the bisection-only path it replaced,
on the same logits, in one run.

Times ``jaxinfer.engine.sampling.sample`` alone (jitted; logits given) for each
batch size, vocabulary size and sampling setting. The logits are Zipf-like
(probability ~ rank^-1.5, ranks shuffled per row), closer to a trained model's
than random normals, whose flat distributions would send every top-p row down
the bisection path. Prints a table (ms per call, best of --repeat).

    python scripts/bench_sampling.py
    python scripts/bench_sampling.py --batches 1,32 --vocabs 49152,262144 --json sampling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

CASES = {
    "greedy": {},
    "temperature 0.8": dict(temperature=0.8),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "repetition 1.1": dict(repetition_penalty=1.1),
}


def zipf_logits(batch: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    base = -1.5 * np.log(np.arange(1, vocab + 1))
    return np.stack([rng.permutation(base) for _ in range(batch)]).astype(np.float32)


def time_sample(draw, logits, params: dict, repeat: int) -> float:
    """Best seconds of one jitted sample() call with ``draw`` as the sampler's draw."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.engine import sampling

    B, V = logits.shape
    rows = dataclasses.replace(sampling.SlotSampling.zeros(B),
                               **{k: jnp.full((B,), v, jnp.int32 if k == "top_k" else jnp.float32)
                                  for k, v in params.items()})
    counts, seen = jnp.zeros((B, V), jnp.int32), jnp.zeros((B, V), bool)
    pos = jnp.zeros((B,), jnp.int32)
    old, sampling._DRAW = sampling._DRAW, draw
    try:
        f = jax.jit(lambda lg, r, c, s, p: sampling.sample(lg, r, c, s, p, want_top=jnp.bool_(False)))
        jax.block_until_ready(f(logits, rows, counts, seen, pos))
    finally:
        sampling._DRAW = old
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(logits, rows, counts, seen, pos))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32", help="rows per call")
    p.add_argument("--vocabs", default="49152,262144", help="vocabulary sizes (SmolLM2's, Gemma 3's)")
    p.add_argument("--repeat", type=int, default=10, help="timings per case (best kept)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxinfer.engine import sampling

    work = [(b, v, c) for v in map(int, args.vocabs.split(",")) for b in map(int, args.batches.split(","))
            for c in CASES]
    rows, cache = [], {}
    for b, v, case in tqdm(work, desc="sampling", unit="case", file=sys.stderr):
        if (b, v) not in cache:
            cache.clear()
            cache[b, v] = jnp.asarray(zipf_logits(b, v))
        lg = cache[b, v]
        new = time_sample(sampling.draw_filtered, lg, CASES[case], args.repeat)
        old = time_sample(sampling._draw_bisected, lg, CASES[case], args.repeat)
        rows.append({"batch": b, "vocab": v, "case": case, "engine_ms": new * 1e3, "bisection_ms": old * 1e3,
                     "speedup": old / new})
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; ms per sample() call, best of {args.repeat}")
    print("| batch | vocab | case | engine ms | bisection-only ms | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['vocab']} | {r['case']} | {r['engine_ms']:.2f} | {r['bisection_ms']:.2f} | "
              f"{r['speedup']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
