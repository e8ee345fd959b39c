"""gRPC serving: ``jaxinfer.v1.Inference`` (server/jaxinfer.proto) over the continuous-batching
scheduler. Entry point: :func:`server.app.build_server`."""
