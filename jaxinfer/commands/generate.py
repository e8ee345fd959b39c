"""``jaxinfer generate``: continue prompts with the compiled engine."""

from __future__ import annotations

import argparse
import json
import sys

from jaxinfer.commands.common import add_model_args, build_engine


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate continuations of prompts",
        description="Generate a continuation for each PROMPT (batched through the engine's slots). "
        "Greedy at temperature 0.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text ('-' reads one prompt from stdin)")
    add_model_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt (default 64)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    s.add_argument("--seed", type=int, default=None, help="random seed (per prompt: seed + index)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: text, token_ids, prompt_token_ids, finish_reason, logprobs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaxinfer.engine.types import SamplingParams

    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    engine = build_engine(args, lazy_compile=True)
    tok = engine.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer")
    ids = []
    for text in prompts:
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids.append(tok.encode(text, add_bos=False) if _has_bos_text(tok, text) else tok.encode(text))
        else:
            ids.append(tok.encode(text))
    params = []
    for i in range(len(prompts)):
        sp = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, seed=None if args.seed is None else args.seed + i,
        )
        sp.validate(engine.cfg.vocab_size)
        params.append(sp)
    limit = engine.max_len - 1
    for i, p in enumerate(ids):
        if len(p) + 1 > limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; --max-len {engine.max_len} allows at most {limit - 1}")
    results = engine.generate(ids, params, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    for prompt_ids, res in zip(ids, results):
        text = tok.decode(res["token_ids"])
        if args.json:
            print(json.dumps({
                "text": text,
                "token_ids": res["token_ids"],
                "prompt_token_ids": prompt_ids,
                "finish_reason": res["finish_reason"],
                "logprobs": res["logprobs"],
            }, ensure_ascii=False))
        else:
            print(text)
    return 0


def _has_bos_text(tok, text: str) -> bool:
    """True when the rendered chat text already starts with the BOS token."""
    bos = tok.bos_id
    return bos is not None and text.startswith(tok.id_to_piece(bos))
