#!/usr/bin/env python3
"""Engine benchmark: jaxinfer against Hugging Face transformers, side by side.

In one run on one machine, with the same weights:
  * prefill time for prompts of 128 / 512 / 2048 tokens;
  * decode tokens/s at batch 1, 8 and 32, at context 128 and 1024;
  * the roofline of a decode step: the slower of reading its bytes (weights +
    KV cache read) at the machine's read bandwidth and doing its FLOPs at the
    machine's matmul rate, both measured in the same run;
  * the matmul floor of each batch size: the step's weight matmuls alone (the
    engine's own buffers and kernels, no attention, cache or sampling), and
    the ceilings it sets on the targets' ratios (a square-matmul peak
    overstates what a 32-token matmul reaches).
Prints a table with the ratios and writes JSON; `python scripts/perf_doc.py` turns JSON in
docs/data/ into docs/performance.md's tables and plots.

    python scripts/bench_engine.py                       # SmolLM2-135M float32 vs transformers
    python scripts/bench_engine.py --quick               # small sizes, a smoke run
    python scripts/bench_engine.py --preset llama3-8b-shape --dtype bfloat16 --no-hf \\
        --batches 1,64,256 --contexts 1024 --prefill 2048   # GPU: random weights, no transformers

Absolute times on a shared CPU are noisy; ratios measured in the same run hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Result:
    machine: dict
    model: str
    dtype: str
    bandwidth_gbs: float
    matmul_gflops: float
    param_bytes: int
    prefill: list[dict] = field(default_factory=list)
    decode: list[dict] = field(default_factory=list)
    grouped_prefill: dict = field(default_factory=dict)
    multi_step: list[dict] = field(default_factory=list)
    finer_spans: list[dict] = field(default_factory=list)
    targets: dict = field(default_factory=dict)


def measure_bandwidth(seconds: float = 2.0) -> float:
    """Read bandwidth in bytes/s: the best of two jitted reductions (a flat sum
    and per-row sums) over an array far larger than cache. On the 2-core CPU
    the flat sum alone sometimes runs on one core and reads at half the rate
    the machine can; the faster of the two is what the machine can read."""
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


def measure_matmul_flops(seconds: float = 2.0, dtype: str = "float32") -> float:
    """Matmul FLOP/s: the best of a jitted square matmul in the model's dtype,
    large enough to be compute-bound (the compute roofline of a large decode batch)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    """Median seconds of fn() over repeat runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# --- jaxinfer ---------------------------------------------------------------------------------


def build_engine(args, slots: int, max_len: int, ckpt, span_steps: int = 1):
    from jaxinfer.engine.engine import Engine, EngineConfig
    from jaxinfer.model.transformer import Transformer

    buckets = tuple(b for b in (32, 128, 512) if b < max_len)  # the default: longer prompts go in 512-token chunks
    cfg = EngineConfig(slots=slots, max_len=max_len, prefill_buckets=buckets or (max_len // 2,),
                       decode_rows=tuple(int(b) for b in args.batches.split(",")), lazy_compile=True,
                       decode_steps=getattr(args, "decode_steps", 1), span_steps=span_steps)
    return Engine(Transformer(ckpt.config, params=ckpt.params), cfg, mesh=args.mesh_obj)


def jax_prefill(engine, n: int, repeat: int) -> float:
    from jaxinfer.engine.types import SamplingParams

    prompt = list(np.random.default_rng(n).integers(10, 1000, n))
    return timeit(lambda: engine.prefill(0, prompt, SamplingParams()), repeat)


def jax_grouped_prefill(engine, n: int, tokens: int, repeat: int) -> tuple[float, float]:
    """Seconds to prefill n whole prompts of `tokens` each: n one-prompt calls,
    and one prefill_many call."""
    from jaxinfer.engine.types import SamplingParams

    prompts = [list(np.random.default_rng(100 + i).integers(10, 1000, tokens)) for i in range(n)]
    items = [(i, p, SamplingParams()) for i, p in enumerate(prompts)]
    one = timeit(lambda: [engine.prefill(*it) for it in items], repeat)
    many = timeit(lambda: engine.prefill_many(items), repeat)
    return one, many


def jax_multi_step(engine, batch: int, ctx: int, k: int, tokens: int = 32) -> dict:
    """Seconds per token with one step per decode call and with k steps per
    call, each both pipelined (calls dispatched back to back, as the scheduler
    does) and awaited (each call's result read before the next). Every timing
    starts from freshly prefilled slots at context ``ctx``."""
    from jaxinfer.engine.types import SamplingParams

    active = list(range(batch))

    def fresh():
        for s in active:
            engine.release(s)
            engine.prefill(s, list(np.random.default_rng(s).integers(10, 1000, ctx)), SamplingParams())

    row = {"batch": batch, "context": ctx, "k": k}
    for steps in (1, k):
        fresh()
        engine.decode(active, steps).results()  # compile / warm
        calls = tokens // steps
        for mode in ("pipelined", "awaited"):
            times = []
            for _ in range(3):
                fresh()
                t0 = time.perf_counter()
                for _ in range(calls):
                    h = engine.decode(active, steps)
                    if mode == "awaited":
                        h.results()
                h.results()
                times.append((time.perf_counter() - t0) / (calls * steps))
            row[f"{mode}_ms_{steps}"] = float(np.median(times)) * 1e3
    for s in active:
        engine.release(s)
    return row


def jax_decode(engine, batch: int, ctx: int, steps: int) -> float:
    """Seconds per decode step with `batch` slots at context `ctx`."""
    from jaxinfer.engine.types import SamplingParams

    for s in range(batch):
        engine.prefill(s, list(np.random.default_rng(s).integers(10, 1000, ctx)), SamplingParams())
    active = list(range(batch))
    engine.decode(active).result()  # compile / warm
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            h = engine.decode(active)
        h.result()
        times.append((time.perf_counter() - t0) / steps)
    for s in active:
        engine.release(s)
    return float(np.median(times))


def matmul_floor_program(engine, batch: int):
    """A decode step's weight matmuls alone at `batch` tokens:
    every layer's projections (q/k/v, o, gate/up, down) and the LM head, on the
    engine's own weight buffers and layout, through the model's own
    ``linear_t``, with the norms and residual adds that chain them. No
    attention, KV cache or sampling. What a decode step at this batch would
    cost if all else were free, on this machine under XLA's kernels: the
    floor under the step, and the honest ceiling for the batch ratios (a
    square-matmul peak overstates what small-batch matmuls reach).
    Returns the jitted function and its arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxinfer.model.transformer import linear_t, rms_norm

    cfg = engine.cfg
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    graphdef = engine.graphdef

    def step(params, x):  # x: [D, batch], features first as in the engine
        state, layers = params
        keep = []
        for p in layers:
            h = rms_norm(x, p["attn_norm"], eps, off, 0)
            if "wqkv_t" in p:
                qkv = linear_t(p["wqkv_t"], h)  # [heads + 2 kv_heads, Hd, N]
                q = qkv[: cfg.num_heads]
            else:
                q = linear_t(p["wq_t"], h)
                keep += [linear_t(p["wk_t"], h)[0, 0], linear_t(p["wv_t"], h)[0, 0]]
            wo = p["wo_t"]
            x = x + linear_t(wo.reshape(wo.shape[0], -1), q.reshape(-1, batch))
            h = rms_norm(x, p["mlp_norm"], eps, off, 0)
            gu = linear_t(p["w_gate_up_t"], h)  # [F, 2, N]
            act = jax.nn.silu(gu[:, 0]) if cfg.activation == "silu" else jax.nn.gelu(gu[:, 0], approximate=True)
            x = x + linear_t(p["w_down_t"], act * gu[:, 1])
        model = nnx.merge(graphdef, state)
        hidden = rms_norm(x.T.reshape(batch, 1, -1), model.final_norm[...], eps, off)  # as the engine does
        logits = model.logits(hidden[:, 0])
        return jnp.max(logits, axis=-1), keep

    params = engine.params
    x = jax.random.normal(jax.random.key(0), (cfg.hidden_size, batch)).astype(params[1][0]["wo_t"].dtype)
    return jax.jit(step), (params, x)


def matmul_floor(engine, batch: int, steps: int) -> float:
    """Seconds per call of :func:`matmul_floor_program`, dispatched back to
    back like the decode steps it is compared with (median of 3 timings)."""
    import jax

    f, args = matmul_floor_program(engine, batch)
    f = f.lower(*args).compile()
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps)
    return float(np.median(times))


# --- transformers -------------------------------------------------------------------------------


def hf_prefill(hf, n: int, repeat: int) -> float:
    import torch

    ids = torch.tensor([list(np.random.default_rng(n).integers(10, 1000, n))])

    def run():
        with torch.no_grad():
            hf(ids, use_cache=True, logits_to_keep=1)

    return timeit(run, repeat)


def hf_decode(hf, batch: int, ctx: int, steps: int) -> float:
    import torch

    ids = torch.tensor(np.random.default_rng(0).integers(10, 1000, (batch, ctx)))
    with torch.no_grad():
        out = hf(ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        out = hf(tok, past_key_values=past, use_cache=True)  # warm
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                out = hf(tok, past_key_values=out.past_key_values, use_cache=True)
            times.append((time.perf_counter() - t0) / steps)
    return float(np.median(times))


def load_hf(ckpt_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    source = Path(json.loads((ckpt_dir / "jaxinfer.json").read_text())["source"])
    if source.is_dir():
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()


# --- main ---------------------------------------------------------------------------------------


def random_checkpoint(preset: str, dtype: str, mesh):
    """Random weights of a preset shape, made directly on the devices of `mesh`."""
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
        make = jax.jit(
            lambda k, shape=spec.shape: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype),
            out_shardings=sh[name],
        )
        flat[name] = make(jax.random.key(i))
    return LoadedCheckpoint(config=cfg, params=nest(flat), tokenizer=None, path=Path(preset), dtype=dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint, GGUF, HF dir or built-in name")
    p.add_argument("--preset", default=None, help="random weights of a preset shape instead of --model "
                   "(smollm2-135m, gemma3-270m, llama3-8b-shape)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None, help="device mesh, e.g. model=8")
    p.add_argument("--prefill", default="128,512,2048", help="prompt lengths to time")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--contexts", default="128,1024", help="decode context lengths")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    p.add_argument("--repeat", type=int, default=3, help="timings per prefill size (median)")
    p.add_argument("--decode-steps", type=int, default=1, metavar="K",
                   help="also time K decode steps per call against one, pipelined and awaited, at the "
                   "smallest batch and the largest up to 64 (default 1: skip)")
    p.add_argument("--span-steps", type=int, default=1, metavar="N",
                   help="also time the largest batch at the longest context on an engine with N attended "
                   "spans per doubling (EngineConfig.span_steps), against the default's powers of two "
                   "(default 1: skip)")
    p.add_argument("--floor-batches", default="all", metavar="LIST",
                   help="batch sizes whose matmul floor to time (the step's weight matmuls alone): 'all' the "
                        "decode batches, 'none', or a list such as 1")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. on a GPU, or with --preset)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few steps")
    p.add_argument("--json", default="bench_engine.json", help="write results here")
    args = p.parse_args(argv)
    if args.quick:
        args.prefill, args.batches, args.contexts, args.steps, args.repeat = "32,64", "1,4", "32", 2, 1

    import jax
    from tqdm import tqdm

    from jaxinfer.checkpoint import load_checkpoint, resolve_model
    from jaxinfer.engine.engine import enable_compilation_cache
    from jaxinfer.engine.engine import param_bytes as engine_param_bytes
    from jaxinfer.model.transformer import KVCache
    from jaxinfer.sharding import make_mesh

    enable_compilation_cache()
    args.mesh_obj = make_mesh(args.mesh)
    prefills = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]

    if args.preset:
        ckpt, args.no_hf = random_checkpoint(args.preset, args.dtype, args.mesh_obj), True
    else:
        ckpt = load_checkpoint(resolve_model(args.model, dtype=args.dtype), mesh=args.mesh_obj)
    cfg = ckpt.config
    hf = None
    if not args.no_hf:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        hf = load_hf(ckpt.path)

    bw = measure_bandwidth()
    peak = measure_matmul_flops(dtype=args.dtype)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ckpt.params))
    n_params = sum(x.size for x in jax.tree.leaves(ckpt.params))
    res = Result(
        machine={"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
                 "devices": [str(d) for d in jax.devices()][:8], "jax": jax.__version__,
                 "load_average": os.getloadavg()},  # other work on a shared machine skews every figure
        model=cfg.name, dtype=args.dtype, bandwidth_gbs=bw / 1e9, matmul_gflops=peak / 1e9, param_bytes=param_bytes,
    )
    # grouped before the decode cases, so that one engine is alive at a time
    # (an 8B model's weights plus a 256-slot cache fill most of a GPU)
    work = [("prefill", n, 0) for n in prefills] + [("grouped", 4, 32)]
    work += [("decode", b, c) for c in contexts for b in batches]
    if args.decode_steps > 1:
        # each timing refills the slots, so keep the batch modest (a GPU run goes to 256)
        work += [("steps", b, min(contexts)) for b in sorted({min(batches), max(b for b in batches if b <= 64)})]
    if args.span_steps > 1:
        work.append(("spans", max(batches), max(contexts)))
    bar = tqdm(work, desc="benchmark", unit="case", file=sys.stderr)
    held: dict = {}

    def engine_for(key, slots, max_len):
        """The engine of `key`, built on first use; the one built before it is
        dropped first, so that only one engine's weights and cache are alive."""
        if key not in held:
            held.clear()
            gc.collect()
            held[key] = build_engine(args, slots, max_len, ckpt, args.span_steps if key == "spans" else 1)
        return held[key]

    decode_len = max(2 * max(contexts), 256)
    floors: dict[int, float] = {}  # batch -> seconds of the weight matmuls alone
    floor_batches = (set(batches) if args.floor_batches == "all" else set() if args.floor_batches == "none"
                     else {int(b) for b in args.floor_batches.split(",")})
    for kind, a, b in bar:
        bar.set_postfix_str(f"{kind} {a} {b}")
        if kind == "steps":  # one decode step per call against decode_steps per call
            eng = engine_for("decode", max(batches), decode_len)
            res.multi_step.append(jax_multi_step(eng, a, b, args.decode_steps))
            tqdm.write(f"steps batch {a} ctx {b}: {res.multi_step[-1]}", file=sys.stderr)
        elif kind == "spans":  # the same decode on an engine with finer attended spans
            eng = engine_for("spans", max(batches), decode_len)  # built with args.span_steps below
            t = jax_decode(eng, a, b, args.steps)
            base = next(r for r in res.decode if r["batch"] == a and r["context"] == b)
            res.finer_spans.append({"batch": a, "context": b, "span_steps": args.span_steps, "step_ms": t * 1e3,
                                    "span": eng.last_decode_variant[1], "default_step_ms": base["step_ms"],
                                    "speedup": base["step_ms"] / (t * 1e3)})
            tqdm.write(f"finer spans: {res.finer_spans[-1]}", file=sys.stderr)
        elif kind == "grouped":  # a prompts of b tokens: one call each, or one prefill_many call
            eng = engine_for("grouped", a, 256)
            one, many = jax_grouped_prefill(eng, a, b, args.repeat)
            res.grouped_prefill = {"prompts": a, "tokens": b, "separate_s": one, "grouped_s": many,
                                   "speedup": one / many}
            tqdm.write(f"grouped: {res.grouped_prefill}", file=sys.stderr)
        elif kind == "prefill":
            max_len = 1 << (a).bit_length()  # room for the prompt + one token
            eng = engine_for(("prefill", max_len), 1, max_len)
            t = jax_prefill(eng, a, args.repeat)
            row = {"tokens": a, "jaxinfer_s": t, "jaxinfer_tok_s": a / t}
            if hf is not None:
                th = hf_prefill(hf, a, args.repeat)
                row.update(transformers_s=th, speedup=th / t)
            flops = 2 * a * n_params
            row["tflops"] = flops / t / 1e12
            res.prefill.append(row)
            tqdm.write(f"prefill: {row}", file=sys.stderr)
        else:
            batch, ctx = a, b
            eng = engine_for("decode", max(batches), decode_len)
            t = jax_decode(eng, batch, ctx, args.steps)
            kv_read = batch * (ctx + 1) * KVCache.bytes_per_token(cfg, eng.state.cache.dtype)
            # the weights as the engine holds them (bfloat16 ones are float32 on a CPU)
            step_bytes = engine_param_bytes(eng) + kv_read
            attn_flops = 4 * batch * (ctx + 1) * cfg.num_layers * cfg.num_heads * cfg.head_dim
            step_flops = 2 * batch * n_params + attn_flops
            if batch not in floors and batch in floor_batches:
                floors[batch] = matmul_floor(eng, batch, args.steps)
            row = {"batch": batch, "context": ctx, "step_ms": t * 1e3, "tok_s": batch / t,
                   "bytes_per_step": step_bytes, "flops_per_step": step_flops}
            if batch in floors:
                row["matmul_floor_ms"] = floors[batch] * 1e3
            if hf is not None:
                th = hf_decode(hf, batch, ctx, args.steps)
                row.update(transformers_tok_s=batch / th, speedup=th / t)
            res.decode.append(row)
            tqdm.write(f"decode: {row}", file=sys.stderr)
        del eng
        Path(args.json).write_text(json.dumps(asdict(res), indent=2))  # partial results, should a run be cut short

    # A shared VM's bandwidth drifts over minutes: measure again at the end, and
    # hold every step to the better of the two.
    bw_end = measure_bandwidth()
    res.machine["bandwidth_gbs_start_end"] = [bw / 1e9, bw_end / 1e9]
    bw = max(bw, bw_end)
    res.bandwidth_gbs = bw / 1e9
    for row in res.decode:
        t, step_bytes, step_flops = row["step_ms"] / 1e3, row["bytes_per_step"], row["flops_per_step"]
        roof_step = max(step_bytes / bw, step_flops / peak)
        row.update(roofline_tok_s=row["batch"] / roof_step, roofline_frac=roof_step / t,
                   mbu=step_bytes / bw / t,  # model-bandwidth utilisation
                   bound="memory" if step_bytes / bw >= step_flops / peak else "compute")

    # targets from the engine issue (CPU, SmolLM2 float32)
    d1 = {r["context"]: r for r in res.decode if r["batch"] == 1}
    dmax = {r["context"]: r for r in res.decode if r["batch"] == max(batches)}
    c0 = min(contexts)
    if c0 in d1:
        res.targets["batch1_vs_transformers"] = d1[c0].get("speedup")
        res.targets["batch1_roofline_frac"] = d1[c0]["roofline_frac"]
    if c0 in d1 and c0 in dmax:
        res.targets[f"batch{max(batches)}_over_batch1"] = dmax[c0]["tok_s"] / d1[c0]["tok_s"]
        # the most this ratio can be on this machine with batch 1 as measured:
        # the large batch at its (compute) roofline
        res.targets[f"batch{max(batches)}_over_batch1_ceiling"] = dmax[c0]["roofline_tok_s"] / d1[c0]["tok_s"]
        # ... and with both batches at their matmul floors: the weight matmuls as XLA
        # runs them at each batch size, everything else free
        if "matmul_floor_ms" in d1[c0] and "matmul_floor_ms" in dmax[c0]:
            res.targets[f"batch{max(batches)}_over_batch1_matmul_ceiling"] = (
                max(batches) * d1[c0]["matmul_floor_ms"] / dmax[c0]["matmul_floor_ms"])
    if c0 in d1 and "speedup" in d1[c0] and "matmul_floor_ms" in d1[c0]:
        # the most batch 1 can gain on transformers if the step were its weight matmuls alone
        res.targets["batch1_vs_transformers_matmul_ceiling"] = (
            d1[c0]["speedup"] * d1[c0]["step_ms"] / d1[c0]["matmul_floor_ms"])
    if res.prefill and hf is not None:
        res.targets["prefill_min_speedup"] = min(r["speedup"] for r in res.prefill)

    print_table(res, hf is not None)
    Path(args.json).write_text(json.dumps(asdict(res), indent=2))
    print(f"wrote {args.json}")
    return 0


def print_table(res: Result, with_hf: bool) -> None:
    print(f"\n{res.model} {res.dtype} on {res.machine['backend']} ({res.machine['cpus']} cpus); "
          f"read bandwidth {res.bandwidth_gbs:.1f} GB/s (best of start/end: "
          f"{'/'.join(f'{x:.1f}' for x in res.machine.get('bandwidth_gbs_start_end', []))}); matmul {res.matmul_gflops:.0f} GFLOP/s; "
          f"weights {res.param_bytes / 2**20:.0f} MiB")
    print("\nprefill   tokens  jaxinfer ms  transformers ms  speedup  TFLOP/s")
    for r in res.prefill:
        hf = f"{r['transformers_s'] * 1e3:15.1f}  {r['speedup']:6.2f}x" if with_hf else f"{'-':>15}  {'-':>7}"
        print(f"{'':9} {r['tokens']:6d}  {r['jaxinfer_s'] * 1e3:11.1f}  {hf}  {r['tflops']:7.3f}")
    g = res.grouped_prefill
    if g:
        print(f"\nprefill of {g['prompts']} prompts x {g['tokens']} tokens: {g['separate_s'] * 1e3:.1f} ms in "
              f"{g['prompts']} calls, {g['grouped_s'] * 1e3:.1f} ms in one prefill_many call ({g['speedup']:.2f}x)")
    for m in res.multi_step:
        k = m["k"]
        print(f"\ndecode batch {m['batch']}, context {m['context']}, ms/token: one step per call "
              f"{m['pipelined_ms_1']:.2f} pipelined / {m['awaited_ms_1']:.2f} awaited; {k} steps per call "
              f"{m[f'pipelined_ms_{k}']:.2f} / {m[f'awaited_ms_{k}']:.2f}")
    for f in res.finer_spans:
        print(f"\ndecode batch {f['batch']}, context {f['context']}: {f['default_step_ms']:.1f} ms per step over "
              f"power-of-two spans, {f['step_ms']:.1f} ms with {f['span_steps']} spans per doubling (span "
              f"{f['span']}; {f['speedup']:.2f}x)")
    print("\ndecode  batch  context  step ms  matmuls ms   tok/s  roofline tok/s  bound    of roofline  "
          "transformers tok/s  speedup")
    for r in res.decode:
        hf = f"{r['transformers_tok_s']:18.1f}  {r['speedup']:6.2f}x" if with_hf else f"{'-':>18}  {'-':>7}"
        print(f"{'':7} {r['batch']:5d}  {r['context']:7d}  {r['step_ms']:7.1f}  {r.get('matmul_floor_ms', float('nan')):10.1f}  {r['tok_s']:6.1f}  "
              f"{r['roofline_tok_s']:14.1f}  {r['bound']:7}  {r['roofline_frac'] * 100:10.0f}%  {hf}")
    print("\ntargets:", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.targets.items()}))


if __name__ == "__main__":
    sys.exit(main())
