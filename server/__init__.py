"""Serving: gRPC ``jaxinfer.v1.Inference`` (server/jaxinfer.proto) and the OpenAI-compatible HTTP
API (:mod:`server.openai_api`) over one continuous-batching scheduler. Entry point:
:func:`server.app.build_server`."""
