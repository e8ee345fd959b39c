"""Run an engine to completion through the scheduler in process (the one batching loop), for
engine tests that check tokens and log-probs rather than text."""

from __future__ import annotations

from typing import Sequence

from jaxinfer.api import LLM
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.types import SamplingParams, ScoreOutput


class IdTokenizer:
    """A tokenizer for engines built without one: the model's vocabulary size and EOS ids, no text."""

    bos_id = None
    bos_token = None
    add_bos = False

    def __init__(self, engine: Engine) -> None:
        self.vocab_size = engine.cfg.vocab_size
        self.eos_ids = tuple(engine.cfg.eos_token_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        raise TypeError("IdTokenizer has no text: give token ids")

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return ""


def generate(engine: Engine, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *, max_tokens: int,
             stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False) -> list[dict]:
    """Each prompt's ``token_ids``, ``logprobs`` (of the sampled tokens) and ``finish_reason``."""
    tok = engine.tokenizer if engine.tokenizer is not None else IdTokenizer(engine)
    with LLM(engine, tok) as llm:
        outs = llm.generate([list(p) for p in prompts], params, max_tokens=max_tokens,
                            stop_token_ids=stop_token_ids or (), ignore_eos=ignore_eos, logprobs=True)
    return [{"token_ids": list(o.token_ids), "logprobs": [t.logprob for t in o.logprobs],
             "finish_reason": o.finish_reason} for o in outs]


def score(engine: Engine, context: Sequence[int], continuation: Sequence[int]) -> ScoreOutput:
    """log p(continuation | context) through the scheduler's score path (pages, prefix cache)."""
    tok = engine.tokenizer if engine.tokenizer is not None else IdTokenizer(engine)
    with LLM(engine, tok) as llm:
        (out,) = llm.score([(list(context), list(continuation))])
    return out
