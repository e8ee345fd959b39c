"""Request bodies of the OpenAI-compatible API (pydantic), as the OpenAI API reference and vLLM define them.

Every model forbids unknown fields, so a field this server does not know gets a 400 that names it
instead of being ignored. Fields the API defines but this server cannot honour yet (``suffix``,
``best_of`` > ``n``, a non-empty ``logit_bias``, JSON response formats, tools) are accepted by
the schema and refused by :func:`unsupported` with a message that says so.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from jaxinfer.engine.types import MAX_TOP_LOGPROBS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields common to completions and chat completions (extras as vLLM names them)."""

    model: str | None = None
    temperature: float | None = Field(None, description="OpenAI's default is 1")
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras other servers accept
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = 16  # the API's default
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None
    image_url: dict | None = None  # named so that its refusal says what it is, not "unknown field"


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class Unsupported(ValueError):
    """A field the API defines that this server cannot honour (400 naming it)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def unsupported(req: CompletionRequest | ChatCompletionRequest, max_n: int) -> None:
    """Raise :class:`Unsupported` for a field given a value this server does not implement, and
    check the API-level limits the scheduler does not know (n, logprobs counts)."""
    if not 1 <= req.n <= max_n:
        raise Unsupported("n", f"n={req.n} must be in [1, {max_n}]")
    if req.logit_bias:
        raise Unsupported("logit_bias", "logit_bias is not supported by this server")
    if req.stream_options is not None and not req.stream:
        raise Unsupported("stream_options", "stream_options is only allowed with stream=true")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported by this server")
        if req.best_of is not None and req.best_of != req.n:
            raise Unsupported("best_of", f"best_of={req.best_of} other than n={req.n} is not supported by this server")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise Unsupported("logprobs", f"logprobs={req.logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")
        if isinstance(req.prompt, list) and not req.prompt:
            raise Unsupported("prompt", "prompt is an empty list")
        return
    if req.response_format is not None and req.response_format.type != "text":
        raise Unsupported(
            "response_format", f"response_format type {req.response_format.type!r} is not supported "
            "(no constrained decoding yet): only 'text'"
        )
    if req.tools:
        raise Unsupported("tools", "tools (function calling) are not supported by this server")
    if req.tool_choice not in (None, "none"):
        raise Unsupported("tool_choice", "tool_choice is not supported by this server (no tool calling)")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs=true")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise Unsupported("top_logprobs", f"top_logprobs={req.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")
    if not req.messages:
        raise Unsupported("messages", "messages is empty")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: content parts joined, text parts only."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            parts = []
            for k, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise Unsupported(
                        f"messages[{i}].content[{k}]",
                        f"messages[{i}].content[{k}] of type {part.type!r}: only text parts are supported",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append({"role": m.role, "content": content})
    return out
