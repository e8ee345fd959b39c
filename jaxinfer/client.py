"""The one gRPC client of ``jaxinfer.v1.Inference`` (server/jaxinfer.proto).

Used by ``jaxinfer client``, ``jaxinfer eval --server``, ``jaxinfer bench serve`` and the lm-eval
backend. It depends only on the wire protocol (the generated stubs in ``server/``), never on the
server's implementation. Calls raise ``grpc.RpcError`` as gRPC does; the caller decides what a
status means to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"

# GenerateRequest fields that are `optional` in the proto: left unset, the server's default applies.
OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "logprobs")


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); ValueError when empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


def generate_request(
    prompt: str = "",
    *,
    prompt_token_ids: Sequence[int] = (),
    messages: Sequence[Mapping[str, str]] | Sequence[tuple[str, str]] = (),
    **fields,
) -> pb.GenerateRequest:
    """A GenerateRequest from text, token ids or chat messages (``{"role", "content"}`` or
    ``(role, content)``); ``fields`` are GenerateRequest fields, and the optional ones given as
    None stay unset."""
    given = sum(bool(x) for x in (prompt, prompt_token_ids, messages))
    if given > 1:
        raise ValueError("give one of prompt, prompt_token_ids and messages")
    req = pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    if prompt_token_ids:
        req.prompt_token_ids.extend(int(t) for t in prompt_token_ids)
    elif messages:
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            req.messages.add(role=role, content=content)
    else:
        req.prompt = prompt
    return req


class InferenceClient:
    """One channel to a ``jaxinfer serve``. ``timeout`` (seconds) is every call's default deadline."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        auth_token: str | None = None,
        tls_ca: bytes | None = None,
        tls: bool = False,
        timeout: float | None = None,
        max_receive_bytes: int = 64 << 20,
    ) -> None:
        self.address = address
        self.timeout = timeout
        opts = [("grpc.max_receive_message_length", max_receive_bytes)]
        if tls or tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None

    @classmethod
    def connect(cls, address: str = DEFAULT_ADDRESS, *, auth_token_file: str | Path | None = None,
                tls_ca_file: str | Path | None = None, tls: bool = False, timeout: float | None = None,
                ) -> InferenceClient:
        """A client from the command-line options: token and CA certificate read from files."""
        return cls(address, auth_token=read_token_file(auth_token_file) if auth_token_file else None,
                   tls_ca=Path(tls_ca_file).read_bytes() if tls_ca_file else None, tls=tls, timeout=timeout)

    def _kw(self, timeout: float | None) -> dict:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    def generate(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """The response stream of one Generate call (``.cancel()`` on it cancels the call)."""
        return self._stub.Generate(request, **self._kw(timeout))

    def score(self, context: str, continuations: Sequence[str], *, timeout: float | None = None) -> pb.ScoreResponse:
        return self._stub.Score(pb.ScoreRequest(context=context, continuations=list(continuations)),
                                **self._kw(timeout))

    def tokenize(self, text: str = "", *, messages: Sequence[tuple[str, str]] = (), add_bos: bool | None = None,
                 timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(text=text)
        for role, content in messages:
            req.messages.add(role=role, content=content)
        if add_bos is not None:
            req.add_bos = add_bos
        return list(self._stub.Tokenize(req, **self._kw(timeout)).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        return self._stub.Detokenize(pb.DetokenizeRequest(token_ids=list(token_ids)), **self._kw(timeout)).text

    def model_info(self, *, timeout: float | None = 30.0) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """The serving status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` ('' = the server)."""
        resp = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["InferenceClient", "generate_request", "read_token_file", "DEFAULT_ADDRESS", "OPTIONAL_FIELDS"]
