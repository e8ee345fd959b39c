"""Arguments and construction shared by the commands that run a model in-process."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re

log = logging.getLogger("jaxinfer")

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_args(p: argparse.ArgumentParser, *, slots: int = 8, max_len: int = 2048) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="converted checkpoint directory, GGUF file, Hugging Face directory (config.json + safetensors) "
        "or built-in name (smollm2-135m-instruct, gemma3-270m); non-converted models are converted once "
        f"into ~/.cache/jaxinfer (or $JAXINFER_CACHE). Default: {DEFAULT_MODEL}",
    )
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="checkpoint dtype to load or convert to (default: the checkpoint's; float32 when "
                   "converting)")
    g.add_argument("--weight-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype the engine holds the weights in and computes with (default: the checkpoint's, "
                   "except bfloat16 on a CPU, held as float32: XLA CPU has no bfloat16 matmul and would convert "
                   "every weight on every step, ~10x slower)")
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh, e.g. data=2,model=4 (default: one device)")
    g.add_argument("--slots", type=int, default=slots, help=f"KV cache slots = concurrent sequences (default {slots})")
    g.add_argument("--max-len", type=int, default=max_len,
                   help=f"longest sequence (prompt + output) per slot (default {max_len})")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="size the KV cache from a memory budget instead of --slots, e.g. 2GiB or 512MiB "
                   "(slots = budget / (bytes per token x --max-len))")
    g.add_argument("--prefill-buckets", default=None, metavar="N,N,...",
                   help="prompt-length buckets to compile; the largest is the chunk size for longer prompts "
                   "(default 32,128,512)")
    g.add_argument("--prefill-rows", type=int, default=None, metavar="N",
                   help="whole prompts shorter than the largest bucket are prefilled up to N per call "
                   "(compiles one N-row program per smaller bucket; 1 = one prompt per call; default 4)")
    g.add_argument("--decode-steps", type=int, default=None, metavar="K",
                   help="decode steps per device call (a device loop; compiles a K-step program beside each "
                   "one-step one). Saves the per-call host cost, which dominates batch-1 decode on a GPU; "
                   "tokens then stream K at a time. Default 1")
    g.add_argument("--span-steps", type=int, default=None, metavar="N",
                   help="attended spans per doubling of the context: 1 = powers of two (a step reads up to 2x "
                   "the positions it needs); 2 adds the points half way (up to 1.5x; about twice the programs "
                   "to compile). Default 1")


def build_engine(args: argparse.Namespace, *, lazy_compile: bool):
    """Resolve --model (converting if needed) and build the engine on --mesh."""
    from jaxinfer.checkpoint import resolve_model
    from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache

    enable_compilation_cache()
    path = resolve_model(args.model, dtype=args.dtype or "float32")
    cfg = EngineConfig(slots=args.slots, max_len=args.max_len, lazy_compile=lazy_compile,
                       memory_budget_bytes=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None)
    if args.prefill_buckets:
        cfg = dataclasses.replace(cfg, prefill_buckets=tuple(int(x) for x in args.prefill_buckets.split(",")))
    if getattr(args, "prefill_rows", None) is not None:
        cfg = dataclasses.replace(cfg, prefill_rows=args.prefill_rows)
    if getattr(args, "decode_steps", None) is not None:
        cfg = dataclasses.replace(cfg, decode_steps=args.decode_steps)
    if getattr(args, "span_steps", None) is not None:
        cfg = dataclasses.replace(cfg, span_steps=args.span_steps)
    if getattr(args, "weight_dtype", None) is not None:
        cfg = dataclasses.replace(cfg, weight_dtype=args.weight_dtype)
    engine = Engine.from_checkpoint(path, mesh=args.mesh, dtype=args.dtype, config=cfg)
    engine.checkpoint_path = path
    log.info("%s", engine.describe())
    return engine


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected e.g. 2GiB, 512MiB, 1GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
