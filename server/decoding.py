"""A request message that cannot be parsed is the client's fault: INVALID_ARGUMENT, not INTERNAL.

grpc answers a request deserializer that raises with INTERNAL ("Exception deserializing
request!"), and the handler never runs. This server interceptor wraps the deserializer of every
unary-request method so that a parse error (invalid UTF-8 in a string field, a field of the wrong
wire type, a truncated message) becomes an :class:`Undecodable` value, and the handler answers it
with INVALID_ARGUMENT naming the message type and the parser's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Undecodable:
    message: str


def _safe(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # the parser's own error type differs between protobuf backends
            return Undecodable(f"request could not be parsed: {e}")

    return parse


def _checked(behavior):
    def handle(request, context):
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return behavior(request, context)

    return handle


class UndecodableRequestInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        make, behavior = (
            (grpc.unary_stream_rpc_method_handler, handler.unary_stream)
            if handler.response_streaming
            else (grpc.unary_unary_rpc_method_handler, handler.unary_unary)
        )
        return make(_checked(behavior), request_deserializer=_safe(handler.request_deserializer),
                    response_serializer=handler.response_serializer)
