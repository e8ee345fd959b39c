"""What the commands share: the help format, the model and engine options, building the engine."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re

from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache
from jaxinfer.loading import DEFAULT_MODEL, ModelSource, build_engine, resolve

log = logging.getLogger("jaxinfer")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default printed once, by argparse (so help strings never spell it out),
    except where there is nothing to say (None, off switches, empty lists). A description or
    epilog that holds line breaks is printed as written; one without is wrapped."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], "") or isinstance(action, argparse._HelpAction):
            return action.help or ""
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str, example: str,
                **kw) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help format and an example line (``example``: one or
    more commands, one a line)."""
    lines = example.strip().splitlines()
    epilog = ("examples:\n" if len(lines) > 1 else "example:\n") + "".join(f"  {line}\n" for line in lines)
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter, epilog=epilog,
                          **kw)


def add_model_args(p: argparse.ArgumentParser, *, slots: int = 8, max_len: int = 2048) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="converted checkpoint directory, GGUF file, Hugging Face directory (config.json + safetensors) "
        "or built-in name (smollm2-135m-instruct, gemma3-270m); non-converted models are converted once "
        "into ~/.cache/jaxinfer (or $JAXINFER_CACHE)",
    )
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="checkpoint dtype to load or convert to (unset: the checkpoint's; float32 when "
                   "converting)")
    g.add_argument("--weight-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype the engine holds the weights in and computes with (unset: the checkpoint's, "
                   "except bfloat16 on a CPU, held as float32: XLA CPU has no bfloat16 matmul and would convert "
                   "every weight on every step, ~10x slower)")
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh, e.g. data=2,model=4 (unset: one device)")
    g.add_argument("--slots", type=int, default=slots, help="KV cache slots = concurrent sequences")
    g.add_argument("--max-len", type=int, default=max_len, help="longest sequence (prompt + output) per slot")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="size the KV cache from a memory budget instead of --slots, e.g. 2GiB or 512MiB "
                   "(slots = budget / (bytes per token x --max-len))")
    defaults = EngineConfig()
    g.add_argument("--prefill-buckets", default=",".join(str(b) for b in defaults.prefill_buckets),
                   metavar="N,N,...",
                   help="prompt-length buckets to compile; the largest is the chunk size for longer prompts")
    g.add_argument("--prefill-rows", type=int, default=defaults.prefill_rows, metavar="N",
                   help="whole prompts shorter than the largest bucket are prefilled up to N per call "
                   "(compiles one N-row program per smaller bucket; 1 = one prompt per call)")
    g.add_argument("--decode-steps", type=int, default=defaults.decode_steps, metavar="K",
                   help="decode steps per device call (a device loop; compiles a K-step program beside each "
                   "one-step one). Saves the per-call host cost, which dominates batch-1 decode on a GPU; "
                   "tokens then stream K at a time")
    g.add_argument("--span-steps", type=int, default=defaults.span_steps, metavar="N",
                   help="attended spans per doubling of the context: 1 = powers of two (a step reads up to 2x "
                   "the positions it needs); 2 adds the points half way (up to 1.5x; about twice the programs "
                   "to compile)")


def engine_config(args: argparse.Namespace, *, lazy_compile: bool) -> EngineConfig:
    """The EngineConfig the model and engine options describe."""
    return dataclasses.replace(
        EngineConfig(),
        slots=args.slots,
        max_len=args.max_len,
        lazy_compile=lazy_compile,
        memory_budget_bytes=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        prefill_buckets=tuple(int(x) for x in args.prefill_buckets.split(",")),
        prefill_rows=args.prefill_rows,
        decode_steps=args.decode_steps,
        span_steps=args.span_steps,
        weight_dtype=args.weight_dtype,
    )


def engine_from_args(args: argparse.Namespace, *, lazy_compile: bool, model_config: str | None = None,
                     step: int | None = None, tokenizer: str | None = None) -> tuple[Engine, ModelSource]:
    """(engine, :class:`jaxinfer.loading.ModelSource`) for --model on --mesh."""
    enable_compilation_cache()
    source = resolve(args.model, dtype=args.dtype, model_config=model_config, step=step)
    engine = build_engine(source, engine_config(args, lazy_compile=lazy_compile), mesh=args.mesh, dtype=args.dtype,
                          tokenizer=tokenizer)
    log.info("%s", engine.describe())
    return engine, source


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected e.g. 2GiB, 512MiB, 1GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
