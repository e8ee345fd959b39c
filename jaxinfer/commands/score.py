"""``jaxinfer score``: log-likelihood of continuations given contexts (JSON lines)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxinfer.api import LLM
from jaxinfer.commands.common import add_command, add_model_args, engine_from_args
from jaxinfer.tokenizer import tokenize_pair


def register(sub) -> None:
    p = add_command(
        sub, "score",
        help="log-likelihood of continuations given contexts",
        description='Read JSON lines {"context": ..., "continuation": ...} from FILE (default stdin) and write '
        "one JSON line per input: logprob (sum over the continuation's tokens of log p(token | everything "
        "before it)), token_logprobs, is_greedy (every continuation token was the argmax), context_ids, "
        "continuation_ids. The continuation is tokenized on its own and appended to the tokenized context "
        "(BOS before the context when the model adds one; an empty context is [BOS], else [EOS]): "
        "jaxinfer.tokenizer.tokenize_pair, as the Score RPC and evaluation do.",
        example="echo '{\"context\": \"The capital of France is\", \"continuation\": \" Paris\"}' | jaxinfer score",
    )
    p.add_argument("file", nargs="?", default="-", help="JSON lines file ('-' = stdin)")
    add_model_args(p, max_seqs=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with sys.stdin if args.file == "-" else open(args.file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            items.append((str(obj["context"]), str(obj["continuation"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"line {n}: expected {{\"context\": str, \"continuation\": str}} ({e})") from None
    engine, _ = engine_from_args(args, lazy_compile=True)
    with LLM(engine) as llm:
        for context, continuation in items:
            ctx, cont = tokenize_pair(llm.tokenizer, context, continuation, engine.cfg.bos_token_id)
            r = llm.score([(ctx, cont)])[0]
            print(json.dumps({
                "logprob": r.logprob,
                "token_logprobs": list(r.token_logprobs),
                "is_greedy": r.is_greedy,
                "context_ids": ctx,
                "continuation_ids": cont,
            }), flush=True)
    return 0
