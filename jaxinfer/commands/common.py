"""What the commands share: the help format, the model and engine options, building the engine."""

from __future__ import annotations

import argparse
import logging

from jaxinfer.engine.config import CPU_KV_CACHE_BYTES, MAX_LEN_CAP, EngineConfig, parse_size
from jaxinfer.engine.engine import Engine, enable_compilation_cache
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


def add_model_args(p: argparse.ArgumentParser, *, max_seqs: int = 64) -> None:
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
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the weights at load: int8 (per output channel) or int4 (per group of 32 "
                   "inputs); a checkpoint converted with --quantize is already quantized (unset: the "
                   "checkpoint's own format)")
    g.add_argument("--int8-matmul", choices=["auto", "w8a8", "weight-only"], default="auto",
                   help="how quantized weights compute: w8a8 (activations quantized per token, int32 "
                   "accumulation), weight-only (dequantized inside the float matmul); auto: w8a8 on a CPU, "
                   "weight-only on a GPU/TPU (docs/quantization.md)")
    g.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "int8"], default=None,
                   help="dtype of the KV cache pool; int8 keeps a scale per token and head and holds 2x "
                   "(bfloat16) or 4x (float32) the tokens in the same bytes (unset: the weights' dtype)")
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh, e.g. data=2,model=4 (unset: one device)")
    g.add_argument("--max-seqs", type=int, default=max_seqs, metavar="N",
                   help="decode rows: sequences decoded together; independent of memory, "
                   "which --kv-cache-memory bounds")
    g.add_argument("--max-len", type=int, default=None, metavar="N",
                   help=f"longest sequence, prompt + output (default: the model's context, at most {MAX_LEN_CAP}, "
                   "and at most the pool)")
    g.add_argument("--page-size", type=int, default=None, metavar="N",
                   help=f"token positions per KV cache page (unset: {EngineConfig().page_size})")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="bytes of the paged KV cache pool, e.g. 2GiB or 512MiB (default: on CPU "
                   f"{CPU_KV_CACHE_BYTES // 2**20} MiB, 16,384 tokens of SmolLM2 in float32; on a GPU/TPU 85%% "
                   "of the device memory left after the weights); the start-up log reports it in pages, tokens "
                   "and bytes")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="turn off automatic prefix caching (on by default: a prompt's longest cached prefix of "
                   "full pages is reused, not prefilled again)")
    defaults = EngineConfig()
    g.add_argument("--prefill-buckets", default=",".join(str(b) for b in defaults.prefill_buckets),
                   metavar="N,N,...",
                   help="prefill piece lengths to compile; the largest is the chunk size for longer prompts")
    g.add_argument("--prefill-rows", type=int, default=defaults.prefill_rows, metavar="N",
                   help="short prompts are prefilled up to N per call (1 = one prompt per call)")
    g.add_argument("--decode-steps", type=int, default=defaults.decode_steps, metavar="K",
                   help="decode steps per device call (a device loop; compiles a K-step program beside each "
                   "one-step one). Saves the per-call host cost, which dominates batch-1 decode on a GPU; "
                   "tokens then stream K at a time")


def engine_config(args: argparse.Namespace, *, lazy_compile: bool) -> EngineConfig:
    """The EngineConfig the engine flags describe (unset flags keep EngineConfig's defaults)."""
    given = {
        "max_seqs": args.max_seqs,
        "max_len": args.max_len,
        "page_size": args.page_size,
        "kv_cache_bytes": parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        "prefill_buckets": tuple(int(x) for x in args.prefill_buckets.split(",")) if args.prefill_buckets else None,
        "prefill_rows": getattr(args, "prefill_rows", None),
        "decode_steps": getattr(args, "decode_steps", None),
        "weight_dtype": getattr(args, "weight_dtype", None),
        "cache_dtype": getattr(args, "kv_cache_dtype", None),
        "quantize": getattr(args, "quantize", None),
        "int8_matmul": getattr(args, "int8_matmul", None),
    }
    return EngineConfig(lazy_compile=lazy_compile, **{k: v for k, v in given.items() if v is not None})


def engine_from_args(args: argparse.Namespace, *, lazy_compile: bool, model_config: str | None = None,
                     step: int | None = None, tokenizer: str | None = None) -> tuple[Engine, ModelSource]:
    """(engine, :class:`jaxinfer.loading.ModelSource`) for --model on --mesh."""
    enable_compilation_cache()
    source = resolve(args.model, dtype=args.dtype, model_config=model_config, step=step)
    engine = build_engine(source, engine_config(args, lazy_compile=lazy_compile), mesh=args.mesh, dtype=args.dtype,
                          tokenizer=tokenizer)
    log.info("%s", engine.describe())
    return engine, source
