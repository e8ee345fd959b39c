#!/usr/bin/env python3
"""Engine benchmark: this engine, and optionally another commit's, side by side.

In one run on one machine, with the same weights:
  * prefill seconds for prompts of 128 / 512 tokens (one sequence, from position 0);
  * decode tokens/s at batch 1, 8 and 32, at context 128 and 1024;
  * with ``--kv-cache-dtype float32,int8``, the decode cases once per KV cache
    dtype, each in the bytes of the float32 pool: bytes and tokens held, tok/s;
  * with ``--page-sizes``, the decode case at the largest batch and context for
    each page size (how the default page size was picked);
  * with ``--modes``, every case once per weight format (float32, int8 with each
    matmul, int4), side by side with the first, with the bytes each holds;
  * with ``--ref DIR``, the same cases run by ``DIR/scripts/bench_engine.py`` in a
    subprocess over ``DIR``'s own package (e.g. ``git worktree add /tmp/old-engine
    1f6bcd2``: the engine before the paged KV cache), and the ratios.

    python scripts/bench_engine.py --ref /tmp/old-engine
    python scripts/bench_engine.py --quick                      # a smoke run
    python scripts/bench_engine.py --modes float32,int8-w8a8,int8-weight-only,int4
    python scripts/bench_engine.py --page-sizes 16,64,128 --batches 32 --contexts 1024 --prefill 128
    python scripts/bench_engine.py --kv-cache-dtype float32,int8   # KV cache dtypes in the same bytes
    python scripts/bench_engine.py --preset llama3-8b-shape --dtype bfloat16 --batches 1,64,256 \
        --contexts 1024 --prefill 2048                          # GPU: random weights

Absolute times on a shared CPU are noisy; ratios measured in the same run hold
better. Writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timeit(fn, repeat: int) -> float:
    """Median seconds of fn() over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def random_checkpoint(preset: str, dtype: str, mesh):
    """Random weights of a preset shape, made directly on the devices of ``mesh``."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.checkpoint import LoadedCheckpoint
    from jaxinfer.config import PRESETS
    from jaxinfer.model.weights import nest, weight_specs
    from jaxinfer.sharding import weight_shardings

    cfg = PRESETS[preset]
    sh = weight_shardings(cfg, mesh)
    flat = {}
    for i, (name, spec) in enumerate(weight_specs(cfg).items()):
        make = jax.jit(lambda k, shape=spec.shape: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype),
                       out_shardings=sh[name])
        flat[name] = make(jax.random.key(i))
    return LoadedCheckpoint(config=cfg, params=nest(flat), tokenizer=None, path=Path(preset), dtype=dtype)


def measure_bandwidth(seconds: float = 2.0) -> float:
    """Read bandwidth in bytes/s: the best of a jitted sum over an array far larger than cache."""
    import jax
    import jax.numpy as jnp

    n = 512 * 2**20 // 4 if jax.default_backend() == "cpu" else 4 * 2**30 // 4
    x = jnp.ones((n // 1024, 1024), jnp.float32)
    best = float("inf")
    for f in (jax.jit(lambda a: jnp.sum(a)), jax.jit(lambda a: jnp.sum(a, axis=1))):
        f(x).block_until_ready()
        t_end = time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


# --modes: name -> EngineConfig fields
MODES = {
    "float32": {},
    "int8": {"quantize": "int8"},
    "int8-w8a8": {"quantize": "int8", "int8_matmul": "w8a8"},
    "int8-weight-only": {"quantize": "int8", "int8_matmul": "weight-only"},
    "int4": {"quantize": "int4"},
}


def build_engine(ckpt, mesh, *, max_seqs: int, max_len: int, page_size: int, buckets, per_row: int,
                 mode: dict | None = None):
    import jax

    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.pages import KVPool
    from jaxinfer.model.transformer import Transformer

    model = Transformer(ckpt.config, params=ckpt.params)
    bpt = KVPool.bytes_per_token(ckpt.config, jax.tree.leaves(ckpt.params)[0].dtype)
    pages = max_seqs * math.ceil(per_row / page_size)  # every row's longest sequence in the benchmark
    cfg = EngineConfig(max_seqs=max_seqs, max_len=max_len, page_size=page_size, prefill_buckets=buckets,
                       kv_cache_bytes=pages * page_size * bpt, decode_batches=(1, 8), lazy_compile=True,
                       **(mode or {}))
    return Engine(model, cfg, mesh=mesh)


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(10, 1000, n)]


def bench_prefill(engine, n: int, repeat: int) -> float:
    from jaxinfer.engine.types import SamplingParams

    pages = list(range(math.ceil(n / engine.page_size)))
    p = prompt(n, n)

    def run():
        C = engine.prefill_chunk
        for off in range(0, n, C):
            engine.prefill(0, p[off : off + C], SamplingParams(), pages=pages, start=off, last=off + C >= n)
    return timeit(run, repeat)


def bench_decode(engine, batch: int, ctx: int, steps: int, repeat: int = 3) -> float:
    """Seconds per decode step of ``batch`` rows at context ``ctx`` (calls
    dispatched back to back, as the scheduler does)."""
    from jaxinfer.engine.types import SamplingParams

    per = math.ceil((ctx + steps * (repeat + 1) + 2) / engine.page_size)
    tables = {r: list(range(r * per, (r + 1) * per)) for r in range(batch)}
    C = engine.prefill_chunk
    for r in range(batch):
        p = prompt(ctx, r)
        for off in range(0, ctx, C):
            engine.prefill(r, p[off : off + C], SamplingParams(), pages=tables[r], start=off, last=off + C >= ctx)
    rows = list(range(batch))
    engine.decode(rows, tables).result()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(steps):
            h = engine.decode(rows, tables)
        h.result()
        times.append((time.perf_counter() - t0) / steps)
    for r in rows:
        engine.release(r)
    return float(np.median(times))


def run_cases(ckpt, mesh, args, prefills, batches, contexts, page, buckets, mode: str, bandwidth_gbs: float) -> dict:
    """Every prefill and decode case on engines of weight format ``mode``."""
    from jaxinfer.engine.engine import param_bytes

    out: dict = {"prefill": [], "decode": []}
    max_len = max(1 << max(prefills).bit_length(), 2 * max(contexts))
    eng = build_engine(ckpt, mesh, max_seqs=1, max_len=max_len, page_size=page, buckets=buckets,
                       per_row=max(prefills), mode=MODES[mode])
    out["weight_bytes"], out["describe"] = param_bytes(eng), eng.describe()
    for n in prefills:
        t = bench_prefill(eng, n, args.repeat)
        out["prefill"].append({"tokens": n, "jaxinfer_s": t, "jaxinfer_tok_s": n / t})
        print(f"{mode} prefill {n}: {t * 1e3:.1f} ms", file=sys.stderr)
    del eng
    per_row = max(contexts) + args.steps * 4 + 2 + page  # bench_decode's pages per row, rounded up
    eng = build_engine(ckpt, mesh, max_seqs=max(batches), max_len=2 * max(contexts), page_size=page, buckets=buckets,
                       per_row=per_row, mode=MODES[mode])
    out["kv_bytes_per_token"] = eng.bytes_per_token
    for ctx in contexts:
        for b in batches:
            t = bench_decode(eng, b, ctx, args.steps)
            kv_read = b * (ctx + 1) * eng.bytes_per_token  # what the step needs; it reads its whole bucket
            step_bytes = param_bytes(eng) + kv_read
            out["decode"].append({"batch": b, "context": ctx, "step_ms": t * 1e3, "tok_s": b / t,
                                  "bytes_per_step": step_bytes,
                                  "mbu": step_bytes / (bandwidth_gbs * 1e9) / t,
                                  "program": list(eng.last_decode_program)})
            print(f"{mode} decode batch {b} ctx {ctx}: {t * 1e3:.1f} ms/step, {b / t:.1f} tok/s", file=sys.stderr)
    del eng
    return out


def print_modes(results: dict, modes: list[str]) -> None:
    """Each mode against the first: weight bytes, prefill seconds and decode tokens/s."""
    base = results[modes[0]]
    print(f"{'case':<24}" + "".join(f"{m:>20}" for m in modes))
    print(f"{'weights MiB':<24}" + "".join(
        f"{results[m]['weight_bytes'] / 2**20:>11.1f} ({results[m]['weight_bytes'] / base['weight_bytes']:.2f}x)"
        for m in modes))
    for i, row in enumerate(base["prefill"]):
        cells = [results[m]["prefill"][i]["jaxinfer_s"] for m in modes]
        print(f"{'prefill ' + str(row['tokens']) + ' (ms)':<24}"
              + "".join(f"{c * 1e3:>11.1f} ({cells[0] / c:.2f}x)" for c in cells))
    for i, row in enumerate(base["decode"]):
        cells = [results[m]["decode"][i]["tok_s"] for m in modes]
        print(f"{'decode b' + str(row['batch']) + ' ctx ' + str(row['context']) + ' (tok/s)':<24}"
              + "".join(f"{c:>11.1f} ({c / cells[0]:.2f}x)" for c in cells))


def bench_kv_dtypes(ckpt, mesh, dtypes, batches, contexts, steps: int, repeat: int, page: int, buckets) -> list[dict]:
    """``--kv-cache-dtype``: one engine per KV cache dtype, each given the bytes of a float32 pool
    that holds the largest decode case, so the rows compare tokens held per byte and decode speed.
    The engines are timed in turn, ``repeat`` rounds (median), so a load change on a shared machine
    falls on all of them."""
    import jax.numpy as jnp

    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.engine.pages import KVPool
    from jaxinfer.model.transformer import Transformer

    per_row = max(contexts) + steps * 4 + 2 + page  # bench_decode's pages per row, rounded up
    budget = max(batches) * math.ceil(per_row / page) * page * KVPool.bytes_per_token(ckpt.config, jnp.float32)
    engines, rows = [], []
    for dt in dtypes:
        cfg = EngineConfig(max_seqs=max(batches), max_len=2 * max(contexts), page_size=page, prefill_buckets=buckets,
                           kv_cache_bytes=budget, decode_batches=(1, 8), cache_dtype=dt, lazy_compile=True)
        eng = Engine(Transformer(ckpt.config, params=ckpt.params), cfg, mesh=mesh)
        engines.append(eng)
        rows.append({"kv_dtype": dt, "format": eng.kv_dtype, "budget_bytes": budget, "pool_bytes": eng.pool_bytes,
                     "bytes_per_token": eng.bytes_per_token, "tokens": eng.num_pages * eng.page_size, "decode": []})
    for ctx in contexts:
        for b in batches:
            times = [[] for _ in engines]
            for _ in range(repeat):
                for eng, ts in zip(engines, times):
                    ts.append(bench_decode(eng, b, ctx, steps, repeat=1))
            for dt, row, ts in zip(dtypes, rows, times):
                t = float(np.median(ts))
                row["decode"].append({"batch": b, "context": ctx, "step_ms": t * 1e3, "tok_s": b / t})
                print(f"kv {dt}: decode batch {b} ctx {ctx}: {t * 1e3:.1f} ms/step, {b / t:.1f} tok/s", file=sys.stderr)
    del engines
    base = rows[0]
    print(f"{'KV cache':<10}{'pool MiB':>10}{'B/token':>9}{'tokens':>9}{'x tokens':>9}"
          f"  decode tok/s (x {base['kv_dtype']})")
    for row in rows:
        speeds = "  ".join(f"b{d['batch']} ctx {d['context']}: {d['tok_s']:.1f} ({d['tok_s'] / d0['tok_s']:.2f})"
                           for d, d0 in zip(row["decode"], base["decode"]))
        print(f"{row['kv_dtype']:<10}{row['pool_bytes'] / 2**20:>10.1f}{row['bytes_per_token']:>9}{row['tokens']:>9}"
              f"{row['tokens'] / base['tokens']:>9.2f}  {speeds}")
    return rows


def run_reference(ref: Path, args) -> dict:
    """The other commit's own bench, over its own package, in a subprocess."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ref.json"
        cmd = [sys.executable, str(ref / "scripts" / "bench_engine.py"), "--model", args.model, "--no-hf",
               "--floor-batches", "none", "--prefill", args.prefill, "--batches", args.batches,
               "--contexts", args.contexts, "--steps", str(args.steps), "--repeat", str(args.repeat),
               "--json", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ref))
        proc = subprocess.run(cmd, cwd=ref, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"reference bench failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, GGUF, HF dir or built-in name")
    p.add_argument("--preset", default=None, help="random weights of a preset shape instead of --model "
                   "(e.g. llama3-8b-shape)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None, help="device mesh, e.g. model=8")
    p.add_argument("--prefill", default="128,512", help="prompt lengths to time")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--contexts", default="128,1024", help="decode context lengths")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    p.add_argument("--repeat", type=int, default=3, help="timings per case (median)")
    p.add_argument("--page-size", type=int, default=None, help="page size (default: the engine's)")
    p.add_argument("--page-sizes", default=None, help="also time the largest decode case at these page sizes")
    p.add_argument("--kv-cache-dtype", default=None, metavar="DT,DT,...",
                   help="also run the decode cases with each KV cache dtype (float32, bfloat16, int8) in the "
                   "bytes of a float32 pool: bytes and tokens held, decode tokens/s side by side")
    p.add_argument("--ref", type=Path, default=None, help="a checkout of another commit to run side by side")
    p.add_argument("--modes", default="float32", help=f"weight formats to run side by side, of {', '.join(MODES)} "
                   "(int8: this backend's default matmul)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few steps")
    p.add_argument("--json", default="bench_engine.json", help="write results here")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill, args.batches, args.contexts, args.steps, args.repeat = "32,64", "1,4", "32", 2, 1

    import jax

    from jaxinfer.checkpoint import load_checkpoint, resolve_model
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import enable_compilation_cache
    from jaxinfer.sharding import make_mesh

    enable_compilation_cache()
    mesh = make_mesh(args.mesh)
    prefills = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    if args.preset:
        ckpt = random_checkpoint(args.preset, args.dtype, mesh)
    else:
        ckpt = load_checkpoint(resolve_model(args.model, dtype=args.dtype), mesh=mesh)
    page = args.page_size or EngineConfig().page_size
    buckets = (32, 128, 512)
    res: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                             "jax": jax.__version__},
                 "model": ckpt.config.name, "dtype": args.dtype, "page_size": page, "bandwidth_gbs": measure_bandwidth() / 1e9,
                 "prefill": [], "decode": [], "page_sizes": []}
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown --modes {sorted(unknown)}; known: {', '.join(MODES)}")
    res["modes"] = {}
    for mode in modes:
        res["modes"][mode] = run_cases(ckpt, mesh, args, prefills, batches, contexts, page, buckets, mode,
                                       res["bandwidth_gbs"])
    res["prefill"], res["decode"] = res["modes"][modes[0]]["prefill"], res["modes"][modes[0]]["decode"]
    if len(modes) > 1:
        print_modes(res["modes"], modes)
    if args.page_sizes:
        b, ctx = max(batches), max(contexts)
        for ps in (int(x) for x in args.page_sizes.split(",")):
            eng = build_engine(ckpt, mesh, max_seqs=b, max_len=2 * ctx, page_size=ps, buckets=buckets,
                               per_row=ctx + args.steps * 4 + 2 + ps)
            t = bench_decode(eng, b, ctx, args.steps)
            res["page_sizes"].append({"page_size": ps, "batch": b, "context": ctx, "step_ms": t * 1e3})
            print(f"page size {ps}: batch {b} ctx {ctx}: {t * 1e3:.1f} ms/step", file=sys.stderr)
            del eng
    if args.kv_cache_dtype:
        res["kv_cache"] = bench_kv_dtypes(ckpt, mesh, args.kv_cache_dtype.split(","), batches, contexts, args.steps,
                                          args.repeat, page, buckets)
    if args.ref:
        ref = run_reference(args.ref.resolve(), args)
        res["reference"] = {"path": str(args.ref), "prefill": ref["prefill"], "decode": ref["decode"]}
        print(f"{'case':<28}{'this':>12}{'reference':>12}{'ratio':>8}")
        for row in res["prefill"]:
            old = next(r for r in ref["prefill"] if r["tokens"] == row["tokens"])
            row["reference_s"], row["speedup"] = old["jaxinfer_s"], old["jaxinfer_s"] / row["jaxinfer_s"]
            print(f"{'prefill ' + str(row['tokens']):<28}{row['jaxinfer_s'] * 1e3:>10.1f}ms"
                  f"{old['jaxinfer_s'] * 1e3:>10.1f}ms{row['speedup']:>8.2f}")
        for row in res["decode"]:
            old = next(r for r in ref["decode"] if r["batch"] == row["batch"] and r["context"] == row["context"])
            row["reference_tok_s"], row["speedup"] = old["tok_s"], row["tok_s"] / old["tok_s"]
            print(f"{'decode b' + str(row['batch']) + ' ctx ' + str(row['context']):<28}{row['tok_s']:>8.1f}tok/s"
                  f"{old['tok_s']:>8.1f}tok/s{row['speedup']:>8.2f}")
    Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
