"""Arguments and construction shared by the commands that run a model in-process."""

from __future__ import annotations

import argparse
import logging

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
                   help="weight and activation dtype (default: the checkpoint's; float32 when converting)")
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh, e.g. data=2,model=4 (default: one device)")
    g.add_argument("--slots", type=int, default=slots, help=f"KV cache slots = concurrent sequences (default {slots})")
    g.add_argument("--max-len", type=int, default=max_len,
                   help=f"longest sequence (prompt + output) per slot (default {max_len})")
    g.add_argument("--prefill-buckets", default=None, metavar="N,N,...",
                   help="prompt-length buckets to compile; the largest is the chunk size for longer prompts "
                   "(default 32,128,512)")


def build_engine(args: argparse.Namespace, *, lazy_compile: bool):
    """Resolve --model (converting if needed) and build the engine on --mesh."""
    from jaxinfer.checkpoint import resolve_model
    from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache

    enable_compilation_cache()
    path = resolve_model(args.model, dtype=args.dtype or "float32")
    cfg = EngineConfig(slots=args.slots, max_len=args.max_len, lazy_compile=lazy_compile)
    if args.prefill_buckets:
        cfg = EngineConfig(**{**cfg.__dict__, "prefill_buckets": tuple(int(x) for x in args.prefill_buckets.split(","))})
    engine = Engine.from_checkpoint(path, mesh=args.mesh, dtype=args.dtype, config=cfg)
    engine.checkpoint_path = path
    log.info("%s", engine.describe())
    return engine
