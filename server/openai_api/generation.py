"""``/v1/completions`` and ``/v1/chat/completions``: API request -> scheduler requests -> API response.

One API request becomes ``len(prompts) * n`` scheduler requests (choice ``p * n + j`` is prompt
``p``'s ``j``-th sample; with a ``seed``, sample ``j`` uses ``seed + j`` so each is reproducible
and the samples differ). They are built with the :class:`~server.requests.RequestBuilder` the
gRPC front end uses and validated by the scheduler before any is queued, so a batch is refused
whole. Their events are read through :func:`server.openai_api.events.merged` and turned into one
JSON body, or into server-sent events: completions stream ``text_completion`` chunks; chat
streams a role delta first, then content deltas, then a chunk with the ``finish_reason``; with
``stream_options.include_usage`` a last chunk carries the usage; then ``data: [DONE]``.

A sampled choice carries the ``seed`` it was sampled with (the request's ``seed + j``, or one the
server picked when the request gave none), on its final streamed chunk too, so that choice can be
reproduced by sending that seed with ``n`` = 1; greedy choices carry none.

``echo`` with ``logprobs`` (what lm-eval's loglikelihood sends: ``max_tokens`` 0 or 1) scores the
prompt through the scheduler's score path: the first prompt token has no log-probability (None,
as in the API), every later one its own and the top-1 alternative's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from jaxinfer.engine.types import ScoreOutput, SlotToken
from jaxinfer.scheduler import Event, InvalidRequestError, Request, RequestStream, Scheduler, TokenizerLike
from server.openai_api.events import Connection, merged
from server.openai_api.schemas import ChatCompletionRequest, CompletionRequest, chat_messages
from server.requests import RequestBuilder, sampling_params


class ApiError(Exception):
    """An error response: HTTP status, message, the API's error type, the offending field."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def _failure(event: Event) -> ApiError:
    """The error a request that ended without stop / length reports."""
    status = {"cancelled": 503, "deadline": 504}.get(event.finish_reason, 500)
    return ApiError(status, f"request {event.request_id}: {event.message or event.finish_reason}")


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None  # the prompt as given (echo); None: decode the ids when needed


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[SlotToken] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


class Generation:
    """Builds, submits and answers completion and chat requests for one scheduler."""

    def __init__(self, scheduler: Scheduler, tokenizer: TokenizerLike, builder: RequestBuilder, model_name: str) -> None:
        self.scheduler, self.tokenizer, self.builder, self.model_name = scheduler, tokenizer, builder, model_name

    # -- building --------------------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special=False)

    def _requests(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[_Prompt], rid: str,
                  max_tokens: int | None, return_logprobs: bool, top: int) -> list[Request]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
        out = []
        for p, prompt in enumerate(prompts):
            for j in range(req.n):
                sampling = sampling_params(
                    temperature=1.0 if req.temperature is None else req.temperature,  # the API's default
                    top_p=req.top_p, top_k=None if req.top_k in (None, -1) else req.top_k, min_p=req.min_p,
                    repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, seed=None if req.seed is None else req.seed + j,
                    logprobs=top,
                )
                out.append(self.builder.build(
                    prompt.ids, request_id=f"{rid}-{p}-{j}", max_tokens=max_tokens, sampling=sampling,
                    min_tokens=req.min_tokens, stop=stop, stop_token_ids=req.stop_token_ids or (),
                    ignore_eos=req.ignore_eos, return_logprobs=return_logprobs,
                ).request)
        for r in out:  # refuse the whole batch before queueing any of it
            self.scheduler.validate(r)
        return out

    def _submit(self, requests: list[Request], conn: Connection) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for r in requests:
                streams.append(self.scheduler.submit(r))
        except Exception:
            for s in streams:
                s.cancel()
            raise
        conn.attach(streams)
        return streams

    def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        # an empty text is refused as on gRPC (not served as a lone BOS): it is nearly always a client bug
        for i, x in enumerate([p] if isinstance(p, str) else p):
            if isinstance(x, str) and not x:
                raise InvalidRequestError("prompt", f"{'prompt' if isinstance(p, str) else f'prompt[{i}]'} is empty")
        if isinstance(p, str):
            return [_Prompt(self.builder.encode("prompt", p), p)]
        if all(isinstance(x, str) for x in p):
            return [_Prompt(self.builder.encode(f"prompt[{i}]", x), x) for i, x in enumerate(p)]
        if all(isinstance(x, int) for x in p):
            return [_Prompt(list(p), None)]
        return [_Prompt(list(x), None) for x in p]

    # -- prompt log-probabilities (echo) ---------------------------------------------------------------

    async def _prompt_scores(self, prompts: list[_Prompt]) -> list[ScoreOutput | None]:
        async def one(ids: list[int]) -> ScoreOutput | None:
            self.scheduler.check_token_ids("prompt", ids)
            if len(ids) < 2:
                return None
            try:
                return await asyncio.to_thread(self.scheduler.score, ids[:1], ids[1:])
            except InvalidRequestError as e:
                raise InvalidRequestError("prompt", f"prompt: {e}") from None

        return list(await asyncio.gather(*(one(p.ids) for p in prompts)))

    def _prompt_logprobs(self, prompt: _Prompt, score: ScoreOutput | None) -> dict:
        """Completions-style logprobs of the prompt's tokens: None for the first one."""
        lp = _CompletionLogprobs()
        for k, t in enumerate(prompt.ids):
            piece = self._piece(t)
            if k == 0 or score is None:
                lp.add(piece, None, None)
                continue
            top = {self._piece(score.top_ids[k - 1]): score.top_logprobs[k - 1]} if score.top_ids else {}
            top.setdefault(piece, score.token_logprobs[k - 1])
            lp.add(piece, score.token_logprobs[k - 1], top)
        return lp.out

    # -- /v1/completions -------------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, conn: Connection) -> dict | AsyncIterator[str]:
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompts = self._completion_prompts(req)
        want_lp = req.logprobs is not None
        generate = not (req.echo and req.max_tokens == 0)  # max_tokens 0 with echo: the prompt alone
        requests = self._requests(req, prompts, rid, req.max_tokens, want_lp, req.logprobs or 0) if generate else []
        scores = await self._prompt_scores(prompts) if req.echo and want_lp else [None] * len(prompts)
        if not generate:
            for prompt in prompts:
                self.scheduler.check_token_ids("prompt", prompt.ids)
        streams = self._submit(requests, conn)
        created = int(time.time())
        n = len(prompts) * req.n

        def head(i: int) -> tuple[str, dict | None]:
            """The echoed prompt of choice i (text, logprobs)."""
            prompt = prompts[i // req.n]
            if not req.echo:
                return "", None
            text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids)
            return text, self._prompt_logprobs(prompt, scores[i // req.n]) if want_lp else None

        seeds = _seeds(requests) if generate else [{} for _ in range(n)]
        if req.stream:
            return self._stream_completions(req, rid, created, prompts, streams, head, conn, seeds)
        choices = [_Choice() for _ in range(n)] if generate else [_Choice(finish_reason="length") for _ in range(n)]
        await _collect(streams, choices, conn)
        out = []
        for i, c in enumerate(choices):
            text, lp = head(i)
            if want_lp:
                gen = _CompletionLogprobs(offset=len(text))
                for st in c.tokens:
                    gen.add(self._piece(st.token), st.logprob, self._top_dict(st))
                lp = _join(lp, gen.out) if lp else gen.out
            out.append({"index": i, "text": text + "".join(c.text), "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": None, **seeds[i]})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(prompts, choices, req.n)}

    def _top_dict(self, st: SlotToken) -> dict[str, float]:
        top = {self._piece(t): lp for t, lp in zip(st.top_ids, st.top_logprobs)}
        top.setdefault(self._piece(st.token), st.logprob)
        return top

    async def _stream_completions(self, req, rid, created, prompts, streams, head, conn, seeds):
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return sse(body)

        choices = [_Choice() for _ in range(len(prompts) * req.n)]
        offsets = [0] * len(choices)
        if req.echo:
            for i in range(len(choices)):
                text, lp = head(i)
                offsets[i] = len(text)
                yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])
        if not streams:  # echo with max_tokens 0
            for i in range(len(choices)):
                choices[i].finish_reason = "length"
                yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": "length"}])
        async for i, ev, error in _events(streams, choices, conn):
            if error is not None:
                yield sse(error.body())
                break
            lp = None
            if req.logprobs is not None:
                gen = _CompletionLogprobs(offset=offsets[i])
                for st in ev.logprobs:
                    gen.add(self._piece(st.token), st.logprob, self._top_dict(st))
                offsets[i] = gen.offset
                lp = gen.out
            last = seeds[i] if ev.finish_reason is not None else {}
            yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason, **last}])
        else:
            if req.stream_options and req.stream_options.include_usage and not conn.gone:
                yield chunk([], self._usage(prompts, choices, req.n))
        yield sse("[DONE]")

    # -- /v1/chat/completions --------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, conn: Connection) -> dict | AsyncIterator[str]:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        text = self.builder.render_chat(chat_messages(req.messages))
        prompts = [_Prompt(self.builder.encode("messages", text, chat=True), text)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = req.top_logprobs or 0
        requests = self._requests(req, prompts, rid, max_tokens, req.logprobs, top)
        streams = self._submit(requests, conn)
        seeds = _seeds(requests)
        created = int(time.time())
        if req.stream:
            return self._stream_chat(req, rid, created, prompts, streams, top, conn, seeds)
        choices = [_Choice() for _ in range(req.n)]
        await _collect(streams, choices, conn)
        out = [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": {"content": [self._chat_lp(st, top) for st in c.tokens]} if req.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": None, **seeds[i]} for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": self._usage(prompts, choices, req.n)}

    def _chat_lp(self, st: SlotToken, top: int) -> dict:
        def entry(t: int, lp: float) -> dict:
            piece = self._piece(t)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {**entry(st.token, st.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in list(zip(st.top_ids, st.top_logprobs))[:top]]}

    async def _stream_chat(self, req, rid, created, prompts, streams, top, conn, seeds):
        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return sse(body)

        choices = [_Choice() for _ in range(req.n)]
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for i, ev, error in _events(streams, choices, conn):
            if error is not None:
                yield sse(error.body())
                break
            lp = {"content": [self._chat_lp(st, top) for st in ev.logprobs]} if req.logprobs else None
            if ev.text or ev.token_ids:
                yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
            if ev.finish_reason is not None:
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason, **seeds[i]}])
        else:
            if req.stream_options and req.stream_options.include_usage and not conn.gone:
                yield chunk([], self._usage(prompts, choices, req.n))
        yield sse("[DONE]")

    # -- usage -----------------------------------------------------------------------------------------

    @staticmethod
    def _usage(prompts: list[_Prompt], choices: list[_Choice], n: int) -> dict:
        prompt_tokens = sum(len(p.ids) for p in prompts)  # each prompt once, whatever n
        completion = sum(c.completion_tokens for c in choices)
        cached = sum(max(c.cached_tokens for c in choices[p * n : (p + 1) * n]) for p in range(len(prompts)))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


class _CompletionLogprobs:
    """The completions API's logprobs object, built token by token."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, piece: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.out["tokens"].append(piece)
        self.out["token_logprobs"].append(logprob)
        self.out["top_logprobs"].append(top)
        self.out["text_offset"].append(self.offset)
        self.offset += len(piece)


def _seeds(requests: list[Request]) -> list[dict]:
    """Per choice, ``{"seed": s}`` when it is sampled (the seed it used), else nothing."""
    return [{} if r.sampling.greedy else {"seed": r.sampling.seed} for r in requests]


def _join(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _record(choice: _Choice, ev: Event) -> None:
    choice.text.append(ev.text)
    choice.tokens.extend(ev.logprobs)
    if ev.finish_reason is not None:
        choice.finish_reason = ev.finish_reason
        if ev.usage is not None:
            choice.completion_tokens = ev.usage.completion_tokens
            choice.cached_tokens = ev.usage.cached_tokens


async def _events(streams: list[RequestStream], choices: list[_Choice], conn: Connection,
                  ) -> AsyncIterator[tuple[int, Event, ApiError | None]]:
    """Events with their choice recorded; a request that failed gives its error (and ends the
    iteration: the others are cancelled); a client that went away ends it silently."""
    async for i, ev in merged(streams):
        if ev.finish_reason in ("cancelled", "deadline", "error"):
            if conn.gone or (ev.finish_reason == "cancelled" and streams[i].cancelled):
                return
            yield i, ev, _failure(ev)
            return
        _record(choices[i], ev)
        yield i, ev, None


async def _collect(streams: list[RequestStream], choices: list[_Choice], conn: Connection) -> None:
    async for _, _, error in _events(streams, choices, conn):
        if error is not None:
            raise error
    if conn.gone:
        raise ApiError(499, "client closed the connection")


__all__ = ["ApiError", "Generation", "sse"]
