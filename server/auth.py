"""Optional bearer-token authentication: a server interceptor.

Every call must carry ``authorization: Bearer <token>`` metadata, except the
methods under ``open_prefixes`` (the standard health service by default, so load
balancers and orchestrators can probe without the secret). A missing or wrong
token ends the call with UNAUTHENTICATED before the handler runs.
"""

from __future__ import annotations

import hmac
import logging
from typing import Callable, Sequence

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        token: str,
        open_prefixes: Sequence[str] = (HEALTH_PREFIX,),
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if not token:
            raise ValueError("empty auth token")
        self._expected = f"Bearer {token}".encode()
        self._open = tuple(open_prefixes)
        self._on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open):
            return continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        why = "missing bearer token" if not got else "wrong bearer token"
        log.warning("method=%s rejected: %s", method, why)
        if self._on_reject is not None:
            self._on_reject(method)
        return _deny(handler, f"{why}: send metadata 'authorization: Bearer <token>'")


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
