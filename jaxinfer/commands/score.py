"""``jaxinfer score``: log-likelihood of continuations given contexts (JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxinfer.commands.common import add_model_args, build_engine


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="log-likelihood of continuations given contexts",
        description='Read JSON lines {"context": ..., "continuation": ...} from FILE (default stdin) and write '
        "one JSON line per input: logprob (sum over the continuation's tokens of log p(token | everything "
        "before it)), token_logprobs, is_greedy (every continuation token was the argmax), context_ids, "
        "continuation_ids. The continuation is tokenized on its own and appended to the tokenized context "
        "(BOS before the context when the model adds one).",
    )
    p.add_argument("file", nargs="?", default="-", help="JSON lines file ('-' = stdin, the default)")
    add_model_args(p, max_seqs=1)
    p.set_defaults(func=run)


def tokenize_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The scoring convention shared by `score`, the Score RPC and evaluation."""
    return tok.encode(context), tok.encode(continuation, add_bos=False)


def run(args: argparse.Namespace) -> int:
    lines = (sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")).read().splitlines()
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            items.append((str(obj["context"]), str(obj["continuation"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"line {n}: expected {{\"context\": str, \"continuation\": str}} ({e})") from None
    engine = build_engine(args, lazy_compile=True)
    tok = engine.tokenizer
    for context, continuation in items:
        ctx, cont = tokenize_pair(tok, context, continuation)
        if not ctx:
            ctx = [engine.cfg.bos_token_id] if engine.cfg.bos_token_id is not None else ctx
        r = engine.score(ctx, cont)
        print(json.dumps({
            "logprob": r.logprob,
            "token_logprobs": list(r.token_logprobs),
            "is_greedy": r.is_greedy,
            "context_ids": ctx,
            "continuation_ids": cont,
        }), flush=True)
    return 0
