"""The serving benchmark's client for OpenAI-compatible servers (jaxinfer's HTTP API, vLLM,
llama.cpp's ``llama-server``, ...): the same ``model_info`` / ``send`` / ``close`` as the gRPC
:class:`~jaxinfer.evaluation.serving.Client`, so :func:`~jaxinfer.evaluation.serving.run_load`
drives either with the same requests.

Each request is one streamed ``POST /v1/completions`` (greedy, ``ignore_eos`` so that every
request produces its output length, ``stream_options.include_usage`` for the token counts).
TTFT is the time to the first chunk that carries a choice, inter-token latencies are the gaps
between such chunks, and the output token count is the server's ``usage.completion_tokens``
(the number of chunks when a server sends no usage).
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass

import httpx

from jaxinfer.evaluation.serving import BenchRequest, RequestRecord


@dataclass(frozen=True)
class ServerInfo:
    """What the benchmark reads of the server (the fields of gRPC's ModelInfo it uses)."""

    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = ""
    mesh: str = ""
    slots: int = 0
    max_len: int = 0
    version: str = ""


class OpenAIClient:
    """One connection pool to ``base_url`` (``http[s]://host:port``; a bare ``host:port`` means http)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, tls_ca: bytes | None = None,
                 timeout: float = 600.0, model: str | None = None, max_connections: int = 512) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.address = base_url.rstrip("/").removesuffix("/v1")
        verify: bool | ssl.SSLContext = True
        if tls_ca:
            verify = ssl.create_default_context(cadata=tls_ca.decode())
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.address, headers=headers, verify=verify, timeout=timeout,
                                  limits=httpx.Limits(max_connections=max_connections,
                                                      max_keepalive_connections=max_connections))
        self._model = model

    def model_info(self) -> ServerInfo:
        models = self._get("/v1/models")["data"]
        if not models:
            raise ValueError(f"{self.address}/v1/models lists no model")
        card = next((m for m in models if m["id"] == self._model), None) if self._model else models[0]
        if card is None:
            raise ValueError(f"model {self._model!r} is not served by {self.address} ({[m['id'] for m in models]})")
        self._model = card["id"]
        info = self._tokenizer_info()
        eos = info.get("eos_token")
        eos_ids = tuple(self._http.post("/tokenize", json={"prompt": eos, "add_special_tokens": False}).json()["tokens"]
                        ) if eos else ()
        return ServerInfo(model=self._model, vocab_size=int(info.get("vocab_size") or 0), eos_token_ids=eos_ids,
                          max_len=int(card.get("max_model_len") or info.get("model_max_length") or 0))

    def _get(self, path: str) -> dict:
        r = self._http.get(path)
        r.raise_for_status()
        return r.json()

    def _tokenizer_info(self) -> dict:
        r = self._http.get("/tokenizer_info")  # vLLM's; other servers may not have it
        return r.json() if r.status_code == 200 else {}

    def close(self) -> None:
        self._http.close()

    def send(self, req: BenchRequest) -> RequestRecord:
        body = {"model": self._model, "prompt": list(req.prompt_ids) if req.prompt_ids else req.prompt,
                "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        rec = RequestRecord()
        t0 = time.perf_counter()
        last = None
        chunks = 0
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    rec.error = f"HTTP {r.status_code}: {r.text[:300]}"
                    return rec
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error = f"stream error: {obj['error'].get('message')}"
                        return rec
                    choice = (obj.get("choices") or [None])[0]
                    # a chunk with text, or any chunk before the last (a token may decode to no text yet)
                    if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                        if last is None:
                            rec.ttft = now - t0
                        else:
                            rec.itl.append(now - last)
                        last = now
                        chunks += 1
                    usage = obj.get("usage")
                    if usage:
                        rec.prompt_tokens = usage.get("prompt_tokens", 0)
                        rec.output_tokens = usage.get("completion_tokens", 0)
            rec.e2e = time.perf_counter() - t0
            rec.output_tokens = rec.output_tokens or chunks
            rec.prompt_tokens = rec.prompt_tokens or len(req.prompt_ids)
            rec.ok = rec.output_tokens > 0
        except httpx.HTTPError as e:
            rec.error = f"{type(e).__name__}: {e}"
        return rec
