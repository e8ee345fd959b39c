"""Prompt -> :class:`~jaxinfer.scheduler.Request`, shared by both front ends (gRPC and HTTP).

Each front end only maps its own wire format onto these calls: tokenize a prompt or render a
chat, apply the server's defaults (``max_tokens`` when unset, capped to what fits), truncate the
prompt's start when the request asks for it, build the sampling parameters from the fields the
client gave. Validation of the result (lengths, ranges, stop limits, token ids) is the
scheduler's (:meth:`Scheduler.validate`), so both front ends refuse the same requests with the
same message naming the field and its limit.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Mapping, Sequence

from jaxinfer.engine.types import SamplingParams
from jaxinfer.scheduler import InvalidRequestError, Request, Scheduler, TokenizerLike


@dataclass(frozen=True)
class Built:
    request: Request
    prompt_ids: list[int]
    truncated: int  # prompt tokens dropped from the start (truncate_prompt)


def sampling_params(**given) -> SamplingParams:
    """SamplingParams from the fields a client set; None (unset) keeps the default."""
    return SamplingParams(**{k: v for k, v in given.items() if v is not None})


class RequestBuilder:
    """Tokenization, chat rendering, defaults and truncation for one scheduler and tokenizer."""

    def __init__(self, scheduler: Scheduler, tokenizer: TokenizerLike, default_max_tokens: int) -> None:
        self.scheduler, self.tokenizer, self.default_max_tokens = scheduler, tokenizer, default_max_tokens

    def encode(self, field_name: str, text: str, chat: bool = False, add_bos: bool | None = None) -> list[int]:
        if chat:  # a template that writes the BOS text itself must not get a second BOS
            bos = getattr(self.tokenizer, "bos_token", None)
            if isinstance(bos, str) and bos and text.startswith(bos):
                add_bos = False
        try:
            return list(self.tokenizer.encode(text, add_bos=add_bos))
        except ValueError as e:
            raise InvalidRequestError(field_name, f"{field_name}: {e}") from None

    def render_chat(self, messages: Sequence[Mapping[str, str]], field_name: str = "messages") -> str:
        render = getattr(self.tokenizer, "apply_chat_template", None)
        if render is None:
            raise InvalidRequestError(field_name, f"{field_name}: this model's tokenizer has no chat template")
        try:
            return render([dict(m) for m in messages])
        except ValueError as e:
            raise InvalidRequestError(field_name, f"{field_name}: {e}") from None

    def build(
        self,
        prompt_ids: Sequence[int],
        *,
        request_id: str,
        max_tokens: int | None,
        sampling: SamplingParams,
        min_tokens: int = 0,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        return_logprobs: bool = False,
        truncate: bool = False,
        deadline: float | None = None,
    ) -> Built:
        """The request to submit; max_tokens None: the server default, capped to the room left.
        A sampled request without a seed gets a fresh one here, so the front end can return the
        seed used and the client can reproduce the output."""
        if not sampling.greedy and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        ids = list(prompt_ids)
        max_len = self.scheduler.max_seq_tokens  # the model context, the engine and the KV pool
        if max_tokens is None:
            room = max_len - len(ids)
            max_tokens = min(self.default_max_tokens, room) if room >= 1 else self.default_max_tokens
        truncated = 0
        if truncate and len(ids) + max_tokens > max_len and 1 <= max_tokens < max_len:
            keep = max_len - max_tokens
            truncated, ids = len(ids) - keep, ids[-keep:]
        req = Request(
            prompt_ids=tuple(ids),
            max_tokens=max_tokens,
            sampling=sampling,
            request_id=request_id,
            min_tokens=min_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=ignore_eos,
            return_logprobs=return_logprobs,
            deadline=deadline,
        )
        return Built(req, ids, truncated)
