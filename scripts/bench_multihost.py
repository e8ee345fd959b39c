#!/usr/bin/env python3
"""What the per-step broadcast of multi-host serving costs: step time with two processes against one.

Three runs of the same engine on the same number of CPU devices (``--devices``, virtual):

  one process        the plain engine on all devices;
  2 processes, SPMD  two processes with half the devices each, every process making the same
                     engine calls itself (no broadcast): the cost of cross-process collectives;
  2 processes,       process 0 drives a LockstepEngine that broadcasts every call to process 1,
  lockstep           which follows (what ``jaxinfer serve --num-processes 2`` does): the
                     difference to SPMD is the broadcast.

Each run prefills every slot with a short prompt and times decode steps over all slots, both
synchronous (dispatch, read the tokens back) and pipelined (dispatch step k+1 before reading
step k, as the scheduler does), for a few rounds after a warm-up round. The lockstep run also
times bare command broadcasts (a header and nothing else). The three runs are launched
``--repeat`` times, interleaved, and the medians reported. Prints a table; --json writes it.

    python scripts/bench_multihost.py                          # tiny random model
    python scripts/bench_multihost.py --model ~/.cache/jaxinfer/smollm2-135m-instruct-float32-*  # converted dir

On a 2-core machine the two processes also compete for the cores: the figures are what this
machine does, not what two hosts would.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(out: Path) -> Path:
    import dataclasses

    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.config import SMOLLM2_135M
    from jaxinfer.model.weights import random_weights

    cfg = dataclasses.replace(
        SMOLLM2_135M, name="tiny-random", num_layers=4, hidden_size=256, intermediate_size=512, num_heads=8,
        num_kv_heads=4, head_dim=32, vocab_size=1024, max_position_embeddings=1024,
    )
    return save_checkpoint(out, cfg, random_weights(cfg, seed=0), None, progress=False)


# -- worker side -------------------------------------------------------------------------------------


def percentile(xs, q):
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def timed_loop(engine, args) -> dict:
    """Per round: prefill every slot, ``steps`` synchronous decode steps (dispatch, read back),
    release; prefill again, ``steps`` pipelined steps (dispatch step k+1, then read step k, as
    the scheduler does), release. Round 0 warms up (compiles)."""
    from jaxinfer.engine.types import SamplingParams

    slots = list(range(args.slots))
    prompt = [5 + (i % 50) for i in range(args.prompt)]
    per_row = -(-(args.prompt + args.steps + 1) // engine.page_size)  # pages one row's sequence reaches
    tables = {s: list(range(s * per_row, (s + 1) * per_row)) for s in slots}
    prefill_ms, step_ms, pipelined_ms = [], [], []

    def prefill_all(keep: bool) -> None:
        for s in slots:
            t = time.perf_counter()
            engine.prefill(s, prompt, SamplingParams(), pages=tables[s])
            if keep:
                prefill_ms.append((time.perf_counter() - t) * 1e3)

    def release_all() -> None:
        for s in slots:
            engine.release(s)

    for r in range(args.rounds + 1):
        prefill_all(keep=r > 0)
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.decode(slots, tables).result()
            if r:
                step_ms.append((time.perf_counter() - t) * 1e3)
        release_all()
        prefill_all(keep=r > 0)
        t = time.perf_counter()
        previous = engine.decode(slots, tables)
        for _ in range(args.steps - 1):
            current = engine.decode(slots, tables)
            previous.result()
            previous = current
        previous.result()
        if r:
            pipelined_ms.append((time.perf_counter() - t) * 1e3 / args.steps)
        release_all()
    return {
        "prefill_ms": percentile(prefill_ms, 50),
        "step_ms_p50": percentile(step_ms, 50),
        "step_ms_p90": percentile(step_ms, 90),
        "pipelined_step_ms": percentile(pipelined_ms, 50),
        "tokens_per_s": len(slots) * 1e3 / percentile(pipelined_ms, 50),
        "steps": len(step_ms),
    }


def worker(args) -> None:
    import jax

    from jaxinfer import distributed
    from jaxinfer.engine.engine import EngineConfig, enable_compilation_cache
    from jaxinfer.loading import build_engine

    if args.worker != "single":
        distributed.initialize(args.coordinator, 2, args.process_id, heartbeat_timeout_s=30)
    enable_compilation_cache()  # $JAXINFER_XLA_CACHE, set by the driver
    config = EngineConfig(max_seqs=args.slots, max_len=args.max_len, kv_cache_bytes=args.kv_cache_bytes, lazy_compile=True)
    engine = build_engine(args.model, config, mesh=args.mesh)
    out: dict = {"devices": jax.device_count(), "processes": jax.process_count(), "mesh": args.mesh}
    if args.worker == "lockstep":
        if args.process_id:
            distributed.follow(engine)
        else:
            lock = distributed.LockstepEngine(engine, keepalive_s=3600)
            out |= timed_loop(lock, args)
            ch, bare = lock.channel, []
            for _ in range(args.bare):
                t = time.perf_counter()
                ch.send(distributed.Command(distributed.Op.NOOP))
                bare.append((time.perf_counter() - t) * 1e3)
            out["broadcast_ms_p50"] = percentile(bare, 50)
            lock.stop()
        distributed.shutdown()
    else:
        out |= timed_loop(engine, args)  # SPMD: every process makes the same calls
        if args.worker == "spmd":
            distributed.shutdown()
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out), flush=True)


# -- driver side -------------------------------------------------------------------------------------


def launch(mode: str, args, model: Path) -> dict:
    nproc = 1 if mode == "single" else 2
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices // nproc}")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    base = [sys.executable, __file__, "--worker", mode, "--model", str(model), "--mesh", args.mesh,
            "--slots", str(args.slots), "--max-len", str(args.max_len), "--prompt", str(args.prompt),
            "--steps", str(args.steps), "--rounds", str(args.rounds), "--bare", str(args.bare),
            "--coordinator", f"127.0.0.1:{port}"]
    procs = [subprocess.Popen(base + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (so, se) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"{mode} worker failed (exit {p.returncode}):\n{se[-3000:]}")
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted checkpoint directory (default: a tiny random model)")
    ap.add_argument("--devices", type=int, default=4, help="CPU devices in all (split over the processes)")
    ap.add_argument("--mesh", default="data=1,model=4")
    ap.add_argument("--slots", type=int, default=4, help="decode rows (sequences decoded together)")
    ap.add_argument("--kv-cache-bytes", type=int, default=64 << 20, help="bytes of the KV pool")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per slot")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--bare", type=int, default=200, help="bare command broadcasts to time (lockstep run)")
    ap.add_argument("--repeat", type=int, default=3, help="launches of each run (interleaved); medians reported")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=["single", "spmd", "lockstep"], help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.prompt + args.steps >= args.max_len:
        raise SystemExit("--prompt + --steps must stay below --max-len")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_checkpoint(Path(tmp) / "tiny")
        os.environ["JAXINFER_XLA_CACHE"] = str(Path(tmp) / "xla")  # repeats reuse the compiled programs
        runs: dict[str, list[dict]] = {"single": [], "spmd": [], "lockstep": []}
        for i in range(args.repeat):  # interleaved, so load that comes and goes hits every run alike
            for mode in runs:
                t0 = time.perf_counter()
                runs[mode].append(launch(mode, args, model))
                print(f"  {i + 1}/{args.repeat} {mode}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        results = {mode: {k: (percentile([r[k] for r in rs], 50) if isinstance(rs[0][k], float) else rs[0][k])
                          for k in rs[0]} for mode, rs in runs.items()}

    import platform

    name = json.loads((model / "config.json").read_text())["name"] if args.model else "tiny-random (4 layers, hidden 256)"
    load = (load_before[0], os.getloadavg()[0])
    print(f"\nmodel {name}; {args.devices} CPU devices, mesh {args.mesh}, {args.slots} slots decoding, "
          f"prompt {args.prompt}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after (other work on the machine skews the figures)\n")
    rows = [
        ("1 process x {d} devices", "single"),
        ("2 processes x {h} devices, same calls, no broadcast", "spmd"),
        ("2 processes x {h} devices, lockstep (broadcast per call)", "lockstep"),
    ]
    print(f"| {'run':58} | sync step p50 (ms) | p90 (ms) | pipelined step (ms) | prefill p50 (ms) | tokens/s |")
    print(f"|{'-' * 60}|-------------------:|---------:|--------------------:|-----------------:|---------:|")
    for label, key in rows:
        r = results[key]
        label = label.format(d=args.devices, h=args.devices // 2)
        print(f"| {label:58} | {r['step_ms_p50']:18.2f} | {r['step_ms_p90']:8.2f} | {r['pipelined_step_ms']:19.2f} | "
              f"{r['prefill_ms']:16.2f} | {r['tokens_per_s']:8.0f} |")
    lock, spmd, single = results["lockstep"], results["spmd"], results["single"]
    print(f"\nbare command broadcast (2 processes): {lock['broadcast_ms_p50']:.2f} ms p50")
    for what, key in (("sync", "step_ms_p50"), ("pipelined", "pipelined_step_ms")):
        print(f"{what} decode step: lockstep - SPMD = {lock[key] - spmd[key]:+.2f} ms (the broadcast); "
              f"SPMD - one process = {spmd[key] - single[key]:+.2f} ms (cross-process collectives)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": load, "results": results,
                                               "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
