"""The gRPC front end: ``jaxinfer.v1.Inference`` over a :class:`~jaxinfer.scheduler.Scheduler`.

The servicer only turns protos into :class:`~jaxinfer.scheduler.Request` s (tokenize, render
chat, apply defaults, truncate when asked), submits them and relays their event streams; the
scheduler owns validation, queueing and the engine. Status codes:

=====================  ===================================================================
INVALID_ARGUMENT       a field can never be served as given (the message names it and its limit)
RESOURCE_EXHAUSTED     the waiting queue is full (message names the limit); retry later
UNAVAILABLE            draining / shutting down
CANCELLED              the client went away (the slot is freed within one decode step)
DEADLINE_EXCEEDED      the call's deadline passed (likewise)
INTERNAL               this request failed while being served; other requests go on
UNAUTHENTICATED        missing or wrong bearer token (when the server has one)
=====================  ===================================================================

Also served: the standard ``grpc.health.v1.Health``: service names ``""`` and
``jaxinfer.v1.Inference`` are readiness (NOT_SERVING once draining), ``liveness`` stays SERVING
while draining and turns NOT_SERVING only when the scheduler loop is dead (restart the process);
and server
reflection, and (``http=``) the OpenAI-compatible HTTP API of :mod:`server.openai_api` on the same
scheduler. :func:`build_server` wires it all; the ``serve`` command and the tests call it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.engine.types import MAX_TOP_LOGPROBS, EngineProtocol
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import (
    InvalidRequestError,
    NotAcceptingError,
    QueueFullError,
    Request,
    RequestStream,
    Scheduler,
    SchedulerLimits,
    TokenizerLike,
)
from jaxinfer.tokenizer import tokenize_context, tokenize_continuation
from jaxinfer.version import __version__
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.auth import BearerTokenInterceptor
from server.decoding import UndecodableRequestInterceptor
from server.openai_api.server import HttpOptions, HttpServer
from server.requests import RequestBuilder, sampling_params

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
MAX_CONTINUATIONS = 64
READINESS = ("", SERVICE)  # health service names: take traffic or not (NOT_SERVING while draining)
LIVENESS = "liveness"  # health service name: the process works (NOT_SERVING once the scheduler loop died)


@dataclass(frozen=True)
class ModelDescription:
    """What GetModelInfo reports about the served model."""

    name: str
    architecture: str = ""  # e.g. "llama", "gemma3"
    dtype: str = ""
    mesh: str = ""
    max_position_embeddings: int | None = None  # the model's own context limit


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (InferenceServer.port tells which)
    max_queue_requests: int = 256
    max_queue_tokens: int = 1 << 20
    default_max_tokens: int = 256  # when a request leaves max_tokens unset (capped to what fits)
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_message_bytes: int = 4 << 20
    auth_token: str | None = None
    tls_cert: bytes | None = None  # PEM; with tls_key
    tls_key: bytes | None = None
    grace_period: float = 30.0
    max_workers: int | None = None  # None: max_seqs + max_queue_requests + 16
    prefix_cache: bool = True  # automatic prefix caching (--no-prefix-cache: off)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _status_of(e: Exception) -> _Abort:
    if isinstance(e, _Abort):
        return e
    if isinstance(e, InvalidRequestError):
        return _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, QueueFullError):
        return _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, NotAcceptingError):
        return _Abort(grpc.StatusCode.UNAVAILABLE, str(e))
    if isinstance(e, TimeoutError):
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while waiting for the engine")
    log.exception("internal error")
    return _Abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")


def _unary(method):
    """Map exceptions to statuses and count every call's status code."""

    @functools.wraps(method)
    def wrapper(self: InferenceServicer, request, context):
        try:
            response = method(self, request, context)
        except Exception as e:
            status = _status_of(e)
            self._metrics.grpc_call(method.__name__, status.code.name)
            context.abort(status.code, status.message)
        self._metrics.grpc_call(method.__name__, "OK")
        return response

    return wrapper


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the call's deadline; None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else remaining


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = _remaining(context)
    return None if remaining is None else time.monotonic() + remaining


class _GenerateCall:
    """Counts one Generate call's status exactly once: OK / an abort code when the handler gets
    there, else CANCELLED or DEADLINE_EXCEEDED when the RPC ends under it (client gone), which also
    cancels the request so its slot is freed."""

    def __init__(self, metrics: Metrics, context: grpc.ServicerContext) -> None:
        self._metrics, self._context = metrics, context
        self._lock = threading.Lock()
        self._recorded = False
        self._over = False
        self._stream: RequestStream | None = None

    def attach(self, stream: RequestStream) -> RequestStream:
        with self._lock:
            self._stream = stream
            over = self._over
        if over:
            stream.cancel()
        return stream

    def record(self, code: str) -> None:
        with self._lock:
            if self._recorded:
                return
            self._recorded = True
        self._metrics.grpc_call("Generate", code)

    def terminated(self) -> None:  # the RPC is over, for whatever reason
        with self._lock:
            self._over = True
            stream = self._stream
        if stream is not None:
            stream.cancel()
        remaining = _remaining(self._context)
        self.record("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self, scheduler: Scheduler, tokenizer: TokenizerLike, model: ModelDescription, options: ServerOptions,
        metrics: Metrics,
    ) -> None:
        self._sched, self._tok, self._model, self._opts, self._metrics = scheduler, tokenizer, model, options, metrics
        self._req = RequestBuilder(scheduler, tokenizer, options.default_max_tokens)

    # -- Generate --------------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        rid = request.request_id or uuid.uuid4().hex
        call = _GenerateCall(self._metrics, context)
        if not context.add_callback(call.terminated):
            call.terminated()
        try:
            try:
                req, prompt_ids, truncated = self._to_request(request, rid, context)
            except InvalidRequestError:
                self._metrics.request_rejected("invalid")  # (the scheduler counts what it refuses)
                raise
            stream = call.attach(self._sched.submit(req))
            log.info(
                "request_id=%s Generate peer=%s prompt_tokens=%d max_tokens=%d truncated=%d",
                rid, context.peer(), len(prompt_ids), req.max_tokens, truncated,
            )
            first = True
            for ev in stream:
                if ev.finish_reason in ("cancelled", "deadline", "error"):
                    if ev.finish_reason == "cancelled" and stream.cancelled:
                        return  # the client cancelled or disconnected: nobody to tell
                    raise _Abort(
                        {"cancelled": grpc.StatusCode.UNAVAILABLE, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}.get(
                            ev.finish_reason, grpc.StatusCode.INTERNAL
                        ),
                        f"request {rid}: {ev.message or ev.finish_reason} "
                        f"(after {ev.usage.completion_tokens if ev.usage else 0} tokens)",
                    )
                resp = pb.GenerateResponse(request_id=rid, token_ids=ev.token_ids, text=ev.text)
                for lp in ev.logprobs:
                    resp.logprobs.add(
                        token_id=lp.token, logprob=lp.logprob, top_token_ids=lp.top_ids, top_logprobs=lp.top_logprobs
                    )
                if first and request.echo:
                    resp.prompt_token_ids.extend(prompt_ids)
                first = False
                if ev.finish_reason is not None:
                    resp.finish_reason = ev.finish_reason
                    resp.usage.prompt_tokens = ev.usage.prompt_tokens
                    resp.usage.completion_tokens = ev.usage.completion_tokens
                    resp.usage.truncated_prompt_tokens = truncated
                    resp.usage.cached_prompt_tokens = ev.usage.cached_tokens
                    resp.timings.queue_seconds = ev.timings.queue_s
                    resp.timings.ttft_seconds = ev.timings.ttft_s or 0.0
                    resp.timings.total_seconds = ev.timings.total_s
                    if not req.sampling.greedy:
                        resp.seed = req.sampling.seed
                    call.record("OK")
                yield resp
        except Exception as e:
            status = _status_of(e)
            call.record(status.code.name)
            log.info("request_id=%s Generate status=%s message=%r", rid, status.code.name, status.message)
            context.abort(status.code, status.message)

    def _to_request(
        self, r: pb.GenerateRequest, rid: str, context: grpc.ServicerContext
    ) -> tuple[Request, list[int], int]:
        given = [
            name
            for name, present in (
                ("prompt", bool(r.prompt)),
                ("prompt_token_ids", len(r.prompt_token_ids) > 0),
                ("messages", len(r.messages) > 0),
            )
            if present
        ]
        if not given:
            raise InvalidRequestError("prompt", "prompt is empty: give prompt, prompt_token_ids or messages")
        if len(given) > 1:
            raise InvalidRequestError(given[1], f"give exactly one of prompt, prompt_token_ids, messages (got {given})")
        if r.prompt:
            ids = self._req.encode("prompt", r.prompt)
        elif r.messages:
            ids = self._req.encode("messages", self._render_chat(r.messages), chat=True)
        else:
            ids = list(r.prompt_token_ids)
        built = self._req.build(
            ids,
            request_id=rid,
            max_tokens=r.max_tokens if r.HasField("max_tokens") else None,
            sampling=sampling_params(
                temperature=r.temperature if r.HasField("temperature") else None,
                top_k=r.top_k if r.HasField("top_k") else None,
                top_p=r.top_p if r.HasField("top_p") else None,
                min_p=r.min_p if r.HasField("min_p") else None,
                repetition_penalty=r.repetition_penalty if r.HasField("repetition_penalty") else None,
                presence_penalty=r.presence_penalty,
                frequency_penalty=r.frequency_penalty,
                seed=r.seed if r.HasField("seed") else None,
                logprobs=r.logprobs if r.HasField("logprobs") else None,
            ),
            min_tokens=r.min_tokens,
            stop=r.stop,
            stop_token_ids=r.stop_token_ids,
            ignore_eos=r.ignore_eos,
            return_logprobs=r.HasField("logprobs"),
            truncate=r.truncate_prompt,
            deadline=_deadline(context),
        )
        return built.request, built.prompt_ids, built.truncated

    def _render_chat(self, messages) -> str:
        return self._req.render_chat([{"role": m.role, "content": m.content} for m in messages])

    # -- unary calls -----------------------------------------------------------------------------------

    @_unary
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        n = len(request.continuations)
        if not 1 <= n <= MAX_CONTINUATIONS:
            raise InvalidRequestError("continuations", f"{n} continuations (must be 1..{MAX_CONTINUATIONS})")
        try:  # the scoring convention of jaxinfer.tokenizer.tokenize_pair
            context_ids = tokenize_context(self._tok, request.context)
        except ValueError as e:
            raise InvalidRequestError("context", f"context: {e}") from None
        resp = pb.ScoreResponse(context_token_ids=context_ids)
        for i, text in enumerate(request.continuations):
            try:
                cont = tokenize_continuation(self._tok, text)
            except ValueError as e:
                raise InvalidRequestError(f"continuations[{i}]", f"continuations[{i}]: {e}") from None
            try:
                out = self._sched.score(context_ids, cont, timeout=_remaining(context))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"continuations[{i}]", f"continuations[{i}]: {e}") from None
            resp.scores.add(
                logprob=out.logprob, token_logprobs=out.token_logprobs, is_greedy=out.is_greedy, token_ids=cont
            )
        return resp

    @_unary
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        if request.messages and request.text:
            raise InvalidRequestError("messages", "give text or messages, not both")
        add_bos = request.add_bos if request.HasField("add_bos") else None
        if request.messages:
            text = self._render_chat(request.messages)
            return pb.TokenizeResponse(token_ids=self._req.encode("messages", text, chat=True, add_bos=add_bos), text=text)
        return pb.TokenizeResponse(token_ids=self._req.encode("text", request.text, add_bos=add_bos), text=request.text)

    @_unary
    def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.ServicerContext) -> pb.DetokenizeResponse:
        self._sched.check_token_ids("token_ids", request.token_ids)
        return pb.DetokenizeResponse(text=self._tok.decode(list(request.token_ids)))

    @_unary
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        s, m = self._sched, self._model
        return pb.ModelInfo(
            model=m.name,
            architecture=m.architecture,
            vocab_size=s.vocab_size,
            max_len=s.max_seq_tokens,
            slots=s.max_seqs,
            mesh=m.mesh,
            dtype=m.dtype,
            version=__version__,
            prefill_chunk=s.engine.prefill_chunk,
            max_queue_requests=s.limits.max_queue_requests,
            max_queue_tokens=s.limits.max_queue_tokens,
            eos_token_ids=sorted(int(t) for t in self._tok.eos_ids),
            max_stop_strings=s.limits.max_stop_strings,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            page_size=s.page_size,
            num_pages=s.num_pages,
            prefix_cache=s.limits.prefix_cache,
        )


class InferenceServer:
    """A started-or-not gRPC server with its scheduler. ``start()``, then ``drain()`` or ``stop()``."""

    def __init__(
        self, server: grpc.Server, scheduler: Scheduler, health_servicer: health.HealthServicer, metrics: Metrics,
        port: int, options: ServerOptions, http: HttpServer | None = None,
    ) -> None:
        self.grpc_server, self.scheduler, self.health, self.metrics = server, scheduler, health_servicer, metrics
        self.port, self.options = port, options
        self.address = f"{options.host}:{port}"
        self.http = http  # the OpenAI-compatible front end on the same scheduler, when served

    def start(self) -> InferenceServer:
        self.scheduler.on_death(self._on_scheduler_death)
        self.scheduler.start()
        self.grpc_server.start()
        if self.http is not None:
            self.http.start()
        if self.scheduler.running:
            for name in (*READINESS, LIVENESS):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    @property
    def alive(self) -> bool:
        """The scheduler loop runs (the liveness signal; /health on HTTP reads the same)."""
        return self.scheduler.running

    def _on_scheduler_death(self, exc: BaseException) -> None:
        for name in (*READINESS, LIVENESS):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def drain(self, grace: float | None = None) -> bool:
        """Health NOT_SERVING, refuse new requests (UNAVAILABLE), let in-flight ones finish within
        ``grace`` seconds (default options.grace_period), then stop. True when nothing was cut."""
        grace = self.options.grace_period if grace is None else grace
        log.info("draining: grace period %.1fs", grace)
        for name in READINESS:  # liveness stays SERVING: draining is not dying
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        clean = self.scheduler.drain(grace)  # HTTP: /ready and new requests 503 from here on
        self.grpc_server.stop(grace=2.0).wait(5.0)  # lets the handlers send their last responses
        if self.http is not None:
            self.http.stop()
        self.scheduler.close()
        self.health.enter_graceful_shutdown()
        log.info("drained (%s)", "clean" if clean else "in-flight requests cancelled after the grace period")
        return clean

    def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace=None).wait(5.0)
        if self.http is not None:
            self.http.stop(grace=0.0)
        self.scheduler.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def build_server(
    engine: EngineProtocol,
    tokenizer: TokenizerLike,
    model: ModelDescription,
    options: ServerOptions = ServerOptions(),
    *,
    metrics: Metrics | None = None,
    detokenizer=None,
    http: HttpOptions | None = None,
) -> InferenceServer:
    """Scheduler + servicer + health + reflection (+ auth, TLS) bound to ``options.host:port``,
    not started. ``detokenizer``: a factory ``tokenizer -> .add(ids)/.flush()``; None uses
    :class:`jaxinfer.tokenizer.IncrementalDetokenizer`. ``http``: also serve the OpenAI-compatible
    API on the same scheduler (same limits, metrics, drain, TLS certificate; its API key defaults
    to the gRPC bearer token)."""
    metrics = metrics or Metrics()
    limits = SchedulerLimits(
        max_queue_requests=options.max_queue_requests,
        max_queue_tokens=options.max_queue_tokens,
        max_stop_strings=options.max_stop_strings,
        max_stop_length=options.max_stop_length,
        model_max_len=model.max_position_embeddings,
        prefix_cache=options.prefix_cache,
    )
    scheduler = Scheduler(engine, tokenizer, limits, metrics=metrics, detokenizer=detokenizer)
    if options.max_queue_tokens < scheduler.max_len:
        log.warning(
            "max_queue_tokens=%d < max_len=%d: prompts longer than the queue limit are always refused",
            options.max_queue_tokens, scheduler.max_len,
        )
    workers = options.max_workers or scheduler.max_seqs + options.max_queue_requests + 16
    interceptors: list[grpc.ServerInterceptor] = []
    if options.auth_token:
        interceptors.append(
            BearerTokenInterceptor(options.auth_token, on_reject=lambda m: metrics.grpc_call(m.rsplit("/", 1)[-1], "UNAUTHENTICATED"))
        )
    interceptors.append(UndecodableRequestInterceptor())  # after auth: a caller without the token learns nothing
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxinfer-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        # beyond: RESOURCE_EXHAUSTED from grpc itself, at once; more than the pool would wait for a
        # thread in silence
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(scheduler, tokenizer, model, options, metrics), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in (*READINESS, LIVENESS):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{options.host}:{options.port}"
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)]))
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"could not bind {address}")
    http_server = None
    if http is not None:
        http_server = HttpServer(
            scheduler, tokenizer, model.name, dataclasses.replace(http, api_key=http.api_key or options.auth_token),
            metrics=metrics, default_max_tokens=options.default_max_tokens, tls_cert=options.tls_cert,
            tls_key=options.tls_key,
        )
    return InferenceServer(server, scheduler, health_servicer, metrics, port, options, http_server)
