"""The OpenAI-compatible HTTP front end: a FastAPI app over the same scheduler as gRPC.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST
/v1/chat/completions``, vLLM's ``POST /tokenize``, ``POST /detokenize`` and ``GET
/tokenizer_info`` (what lm-eval's ``tokenizer_backend=remote`` calls), ``GET /health``
(liveness), ``GET /ready`` (readiness: loaded, compiled, accepting), ``GET /metrics``
(Prometheus: the server's one registry, gRPC's figures included).

Errors in the API's shape ``{"error": {"message", "type", "param", "code"}}``:

=====  ====================================================================================
400    invalid input: the message names the field and the limit (the scheduler's validation,
       the same as gRPC's), an unknown field, or a field this server does not support
401    missing or wrong ``Authorization: Bearer <key>`` (health, readiness and metrics stay open)
404    unknown route or model
413    request body over ``max_body_bytes``
429    the waiting queue is full
503    draining / not ready
=====  ====================================================================================

A client that disconnects cancels its requests: their slots are freed within one step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from jaxinfer.version import __version__
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import InvalidRequestError, NotAcceptingError, QueueFullError, Scheduler, TokenizerLike
from server.openai_api.events import Connection, watch
from server.openai_api.generation import ApiError, Generation
from server.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    Unsupported,
    chat_messages,
    unsupported,
)
from server.requests import RequestBuilder

log = logging.getLogger(__name__)

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/ready", "/metrics")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (max_body_bytes)")


class _Limits:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413; by Content-Length at once, else while
    reading) and count every response by route and status in the metrics."""

    def __init__(self, app, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else (
            "/v1/models/{id}" if scope["path"].startswith("/v1/models/") else "other")
        status = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            resp = _error(ApiError(413, BodyTooLarge(self.limit).detail))
            await resp(scope, receive, counting_send)
        else:
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.limit:
                        raise BodyTooLarge(self.limit)
                return message

            await self.app(scope, limited_receive, counting_send)
        self.metrics.http_call(route, str(status[0] if status else 499))


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (InvalidRequestError, Unsupported)):
        return ApiError(400, str(e), e.field)
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e))
    if isinstance(e, NotAcceptingError):
        return ApiError(503, str(e))
    if isinstance(e, TimeoutError):
        return ApiError(504, "timed out waiting for the engine")
    log.exception("internal error")
    return ApiError(500, f"internal error: {e}")


def _validation_error(e: RequestValidationError) -> ApiError:
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # a union's alternatives repeat the field with the member tried (e.g. prompt.list[int]): keep the field
    name = ".".join(x for x in loc if not x.startswith(("list[", "str", "int", "dict[")) and "[" not in x) or "body"
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown field {name!r}: not supported by this server", name)
    if first.get("type") == "missing":
        return ApiError(400, f"field {name!r} is required", name)
    return ApiError(400, f"{name}: {first.get('msg')} (got {first.get('input')!r})"[:1000], name)


def build_app(
    scheduler: Scheduler,
    tokenizer: TokenizerLike,
    model_name: str,
    *,
    metrics: Metrics,
    default_max_tokens: int = 256,
    api_key: str | None = None,
    max_body_bytes: int = 4 << 20,
    max_n: int = 16,
) -> FastAPI:
    """The ASGI app (serve it with uvicorn: :class:`server.openai_api.server.HttpServer`)."""
    builder = RequestBuilder(scheduler, tokenizer, default_max_tokens)
    gen = Generation(scheduler, tokenizer, builder, model_name)
    created = int(time.time())
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:  # async: FastAPI runs a plain def on its thread pool
        if expected is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode("utf-8", "replace"), expected):
            why = "missing API key" if not got else "wrong API key"
            raise ApiError(401, f"{why}: send the header 'Authorization: Bearer <key>'")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist: this server serves {model_name!r}", "model")

    app = FastAPI(title="jaxinfer", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, lambda r, e: _error(e))
    app.add_exception_handler(RequestValidationError, lambda r, e: _error(_validation_error(e)))
    app.add_exception_handler(
        HTTPException, lambda r, e: _error(ApiError(e.status_code, str(e.detail) if e.status_code != 404 else
                                                    f"no route {r.method} {r.url.path}"))
    )
    app.add_exception_handler(Exception, lambda r, e: _error(_api_error(e)))
    auth = [Depends(authorized)]

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "jaxinfer",
                "root": model_name, "max_model_len": scheduler.max_seq_tokens}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    async def generate(request: Request, body, run) -> Response:
        try:
            check_model(body.model)
            unsupported(body, max_n)
            conn = Connection()
            watcher = asyncio.create_task(watch(request.receive, conn))
            try:
                result = await run(body, conn)
            except BaseException:
                watcher.cancel()
                raise
        except Exception as e:
            if isinstance(e, (InvalidRequestError, Unsupported)):
                metrics.request_rejected("invalid")  # (the scheduler counts what it refuses itself)
            raise _api_error(e) from None
        if isinstance(result, dict):
            watcher.cancel()
            return JSONResponse(result)

        async def body_stream():
            try:
                async for piece in result:
                    yield piece
            finally:
                watcher.cancel()

        return StreamingResponse(body_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await generate(request, body, gen.completions)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await generate(request, body, gen.chat)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        try:
            if (body.prompt is None) == (body.messages is None):
                raise ApiError(400, "give prompt or messages (exactly one)", "prompt")
            add_bos = None if body.add_special_tokens else False
            if body.messages is not None:
                text = builder.render_chat(chat_messages(body.messages))
                ids = builder.encode("messages", text, chat=True, add_bos=add_bos)
            else:
                ids = builder.encode("prompt", body.prompt, add_bos=add_bos)
        except Exception as e:
            raise _api_error(e) from None
        return {"count": len(ids), "max_model_len": scheduler.max_seq_tokens, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        try:
            scheduler.check_token_ids("tokens", body.tokens)
        except Exception as e:
            raise _api_error(e) from None
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info() -> dict:
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "bos_token": getattr(tokenizer, "bos_token", None),
            "eos_token": getattr(tokenizer, "eos_token", None),
            "pad_token": None,
            "add_bos_token": bool(getattr(tokenizer, "add_bos", False)),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "model_max_length": scheduler.max_seq_tokens,
            "vocab_size": scheduler.vocab_size,
        }

    @app.get("/health")
    async def health() -> Response:
        if not scheduler.running:
            return _error(ApiError(503, "the scheduler loop is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not scheduler.running or not scheduler.load().accepting:
            return _error(ApiError(503, "not ready: draining, stopped or not started"))
        return JSONResponse({"status": "ready", "model": model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Limits, limit=max_body_bytes, metrics=metrics)
    return app
