"""``jaxinfer`` command line: one subcommand per module in ``jaxinfer.commands`` (the top layer:
nothing else in the package imports it).

Each command module defines ``register(subparsers)``, which adds its parser and
sets ``func`` (called with the parsed arguments; its return value is the exit code).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxinfer.commands import bench, client, common, convert, generate, score, serve
from jaxinfer.commands import eval as evaluate

COMMANDS = (convert, generate, score, serve, client, evaluate, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxinfer",
        description="JAX/XLA-compiled LLM inference: convert checkpoints, generate, score, serve.",
        formatter_class=common.HelpFormatter,
        epilog="example:\n  jaxinfer generate 'The capital of France is' --max-tokens 16\n",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # a library imported above may already have configured the root logger
    )
    if not args.verbose:  # orbax/absl narrate every restore at INFO
        logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
