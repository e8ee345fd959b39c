"""``jaxinfer generate``: continue prompts in process, through the same scheduler that serves gRPC."""

from __future__ import annotations

import argparse
import json
import sys

from jaxinfer.api import LLM
from jaxinfer.commands.common import add_command, add_model_args, engine_from_args
from jaxinfer.engine.types import SamplingParams


def register(sub) -> None:
    p = add_command(
        sub, "generate",
        help="generate continuations of prompts",
        description="Generate a continuation for each PROMPT, batched by the continuous-batching scheduler in "
        "this process (the loop that serves gRPC, so stop strings, min tokens, stop ids and logprobs behave as "
        "over the wire). Greedy at temperature 0.",
        example="jaxinfer generate 'The capital of France is' --max-tokens 16 --stop .",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads one prompt from stdin)")
    add_model_args(p)
    s = p.add_argument_group("sampling and stopping")
    s.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt")
    s.add_argument("--min-tokens", type=int, default=0, help="stop conditions are ignored until this many tokens")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None, help="random seed (per prompt: seed + index)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    s.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    s.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="return each token's logprob and N top alternatives (with --json)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: text, token_ids, prompt_token_ids, finish_reason, usage, "
                   "logprobs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    params = [
        SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, seed=None if args.seed is None else args.seed + i,
            logprobs=args.logprobs or 0,
        )
        for i in range(len(prompts))
    ]
    engine, _ = engine_from_args(args, lazy_compile=True)
    with LLM(engine) as llm:
        outs = llm.generate(prompts, params, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                            stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
                            logprobs=args.logprobs is not None, chat=args.chat)
    for out in outs:
        if args.json:
            print(json.dumps({
                "text": out.text,
                "token_ids": list(out.token_ids),
                "prompt_token_ids": list(out.prompt_token_ids),
                "finish_reason": out.finish_reason,
                "usage": {"prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens},
                "logprobs": [
                    {"token_id": t.token, "logprob": t.logprob, "top_token_ids": list(t.top_ids),
                     "top_logprobs": list(t.top_logprobs)}
                    for t in out.logprobs
                ],
            }, ensure_ascii=False))
        else:
            print(out.text)
    return 0
