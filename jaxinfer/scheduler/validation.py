"""Submit-time checks: a request that can never be served is refused at once, naming the field
and the limit (InvalidRequestError; gRPC INVALID_ARGUMENT). Nothing is truncated here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jaxinfer.scheduler.requests import InvalidRequestError, Request, SchedulerLimits


@dataclass(frozen=True)
class Capacity:
    """What one engine can hold, as the checks need it."""

    vocab_size: int
    max_len: int  # min(engine.max_len, limits.model_max_len)
    engine_max_len: int
    num_pages: int
    page_size: int

    @property
    def pool_tokens(self) -> int:
        return self.num_pages * self.page_size


def check_token_ids(name: str, ids: Sequence[int], vocab_size: int) -> None:
    """InvalidRequestError naming the first id outside [0, vocab_size)."""
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(name, f"{name}[{i}]={t} is out of range [0, vocab_size={vocab_size})")


def check_fits(field: str, what: str, tokens: int, cap: Capacity, lim: SchedulerLimits) -> None:
    """A sequence of ``tokens`` positions must fit the context and the whole page pool."""
    if tokens > cap.max_len:
        raise InvalidRequestError(
            field,
            f"{what} = {tokens} exceeds the context limit max_len={cap.max_len} (engine max_len="
            f"{cap.engine_max_len}, model limit={lim.model_max_len or 'none'}); shorten the prompt, lower "
            f"max_tokens, or ask for truncate_prompt",
        )
    if tokens > cap.pool_tokens:
        raise InvalidRequestError(
            field,
            f"{what} = {tokens} exceeds the KV cache pool of {cap.num_pages} pages x {cap.page_size} = "
            f"{cap.pool_tokens} tokens (--kv-cache-memory); it could never fit",
        )


def validate_request(req: Request, lim: SchedulerLimits, cap: Capacity) -> None:
    """Raise InvalidRequestError naming the field and its limit."""
    n = len(req.prompt_ids)
    if len(req.request_id) > lim.max_request_id_length:
        raise InvalidRequestError(
            "request_id", f"request_id has {len(req.request_id)} characters (limit {lim.max_request_id_length})"
        )
    if n == 0:
        raise InvalidRequestError("prompt", "prompt is empty: it must have at least one token")
    check_token_ids("prompt_token_ids", req.prompt_ids, cap.vocab_size)
    if req.max_tokens < 1:
        raise InvalidRequestError("max_tokens", f"max_tokens={req.max_tokens} must be >= 1")
    if not 0 <= req.min_tokens <= req.max_tokens:
        raise InvalidRequestError(
            "min_tokens", f"min_tokens={req.min_tokens} must be in [0, max_tokens={req.max_tokens}]"
        )
    check_fits("max_tokens", f"prompt of {n} tokens + max_tokens={req.max_tokens}", n + req.max_tokens, cap, lim)
    try:
        req.sampling.validate(cap.vocab_size)
    except ValueError as e:
        raise InvalidRequestError(str(e).split("=", 1)[0], str(e)) from None
    if req.sampling.logprobs and not req.return_logprobs:
        raise InvalidRequestError(
            "logprobs", f"{req.sampling.logprobs} top alternatives asked but return_logprobs is off"
        )
    if len(req.stop) > lim.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(req.stop)} stop strings (limit {lim.max_stop_strings})")
    for i, s in enumerate(req.stop):
        if not 0 < len(s) <= lim.max_stop_length:
            raise InvalidRequestError("stop", f"stop[{i}] has {len(s)} characters (must be 1..{lim.max_stop_length})")
    if len(req.stop_token_ids) > lim.max_stop_token_ids:
        raise InvalidRequestError(
            "stop_token_ids", f"{len(req.stop_token_ids)} stop token ids (limit {lim.max_stop_token_ids})"
        )
    check_token_ids("stop_token_ids", req.stop_token_ids, cap.vocab_size)


def validate_score(context: Sequence[int], continuation: Sequence[int], lim: SchedulerLimits, cap: Capacity) -> None:
    if not context:
        raise InvalidRequestError("context", "context is empty (and the tokenizer adds no BOS)")
    if not continuation:
        raise InvalidRequestError("continuation", "continuation is empty")
    check_token_ids("context", context, cap.vocab_size)
    check_token_ids("continuation", continuation, cap.vocab_size)
    n = len(context) + len(continuation)
    check_fits("continuation", f"context of {len(context)} + continuation of {len(continuation)} tokens", n, cap, lim)
