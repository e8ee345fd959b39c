"""Where evaluation runs: in-process on an :class:`~jaxinfer.engine.engine.Engine`, or against a
running ``jaxinfer serve`` over gRPC. Both implement :class:`Backend`.

The scoring convention is the one of ``jaxinfer score`` and the Score RPC
(:func:`jaxinfer.tokenizer.tokenize_pair`): the context is tokenized with BOS when the model
adds one, the continuation on its own without BOS, and the two id lists are concatenated. A
context that tokenizes to nothing is replaced by ``[BOS]`` (or the first end-of-sequence token
when the model has no BOS), as lm-evaluation-harness does.

Token-level scoring (:meth:`Backend.score_tokens`, used by perplexity windows) is exact in
process. The Score RPC takes text, so the server backend sends the decoded text of each id span
and reports, per request, whether the server's tokenization gave back the same ids
(:attr:`TokenScore.exact`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxinfer import sharding
from jaxinfer.api import LLM
from jaxinfer.client import InferenceClient, generate_request
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.types import SamplingParams, ScoreOutput
from jaxinfer.tokenizer import encode_chat, tokenize_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What a result file records about the model that produced it."""

    model: str  # what the user named: a path, a built-in name, or the server's model name
    checkpoint: str | None = None  # the directory the weights were restored from
    step: int | None = None  # training step of a training-run checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (in process)
    dtype: str = ""
    mesh: str = ""
    slots: int = 0
    max_len: int = 0
    server: str | None = None  # HOST:PORT when evaluated against a server
    add_bos: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationOptions:
    """Per-prompt generation settings (the sampling options of ``jaxinfer generate``)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first match
    ignore_eos: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
        )


@dataclass(frozen=True)
class Prompt:
    """Text, or chat messages rendered with the model's chat template."""

    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # stop | length


@dataclass(frozen=True)
class TokenScore:
    """A :class:`ScoreOutput` plus whether the ids scored are exactly the ids asked for."""

    output: ScoreOutput
    exact: bool = True


Progress = Callable[[int], None]  # called with the number of tokens just scored


class Backend(abc.ABC):
    """Scores and generations from one model. ``max_len`` bounds context + continuation."""

    info: ModelInfo

    @property
    def max_len(self) -> int:
        return self.info.max_len

    @abc.abstractmethod
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (``add_bos=None``: as the model does)."""

    @abc.abstractmethod
    def score_tokens(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: Progress | None = None
    ) -> list[TokenScore]:
        """log p(continuation ids | context ids) for each pair."""

    @abc.abstractmethod
    def score_texts(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None) -> list[ScoreOutput]:
        """log p(continuation | context) under the scoring convention (module docstring)."""

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], options: Sequence[GenerationOptions], progress: Progress | None = None
    ) -> list[Generation]:
        """Generate for every prompt, batched as the backend allows."""

    def close(self) -> None:
        """Release the engine or the channel."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- in process ---------------------------------------------------------------------------------


class EngineBackend(Backend):
    """An :class:`Engine` in this process, driven by the scheduler loop of an :class:`~jaxinfer.api.LLM`
    for the duration of each call: scoring through ``Scheduler.score_batch`` (the engine packs pairs of
    one length bucket into its slots), generation through continuous batching (stop strings, early
    finish)."""

    SCORE_GROUP = 64  # pairs per score_batch call (progress granularity)

    def __init__(self, engine: Engine, tokenizer=None, *, model: str = "", checkpoint: str | Path | None = None,
                 step: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{model or engine.name}: the checkpoint carries no tokenizer (give one with --tokenizer)")
        self.info = ModelInfo(
            model=model or engine.name,
            checkpoint=str(checkpoint) if checkpoint is not None else None,
            step=step,
            config=json.loads(engine.cfg.to_json()),
            dtype=str(engine.dtype),
            mesh=sharding.describe(engine.mesh),
            slots=engine.max_seqs,
            max_len=engine.max_len,
            add_bos=bool(self.tokenizer.add_bos),
            bos_id=engine.cfg.bos_token_id if engine.cfg.bos_token_id is not None else self.tokenizer.bos_id,
            eos_ids=tuple(int(i) for i in (self.tokenizer.eos_ids or engine.cfg.eos_token_ids)),
        )

    def _llm(self) -> LLM:
        return LLM(self.engine, self.tokenizer)

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=add_bos))

    def score_tokens(self, pairs, progress=None) -> list[TokenScore]:
        out: list[TokenScore] = []
        with self._llm() as llm:
            for off in range(0, len(pairs), self.SCORE_GROUP):
                group = pairs[off : off + self.SCORE_GROUP]
                out.extend(TokenScore(s) for s in llm.score(group))
                if progress:
                    progress(sum(len(c) for _, c in group))
        return out

    def text_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return tokenize_pair(self.tokenizer, context, continuation, self.info.bos_id)

    def score_texts(self, pairs, progress=None) -> list[ScoreOutput]:
        ids = [self.text_pair(c, x) for c, x in pairs]
        return [s.output for s in self.score_tokens(ids, progress)]

    def generate(self, prompts, options, progress=None) -> list[Generation]:
        done = (lambda c: progress(len(c.token_ids))) if progress else None
        with self._llm() as llm:
            requests = [
                llm.request(self._encode_prompt(p), opt.sampling(), max_tokens=opt.max_tokens, stop=opt.stop,
                            ignore_eos=opt.ignore_eos, index=i)
                for i, (p, opt) in enumerate(zip(prompts, options))
            ]
            completions = llm.run(requests, done)
        return [Generation(c.text, c.token_ids, c.usage.prompt_tokens, c.finish_reason) for c in completions]

    def _encode_prompt(self, p: Prompt) -> list[int]:
        if not p.messages:
            return self.tokenize(p.text)
        return encode_chat(self.tokenizer, [{"role": r, "content": c} for r, c in p.messages])


# --- against a server ----------------------------------------------------------------------------


class ServerBackend(Backend):
    """A running ``jaxinfer serve``, through :class:`~jaxinfer.client.InferenceClient`. Requests go
    out ``concurrency`` at a time, so the server's continuous batching sees them together."""

    def __init__(self, address: str, *, auth_token: str | None = None, tls_ca: bytes | None = None, tls: bool = False,
                 concurrency: int = 16, timeout: float | None = 600.0) -> None:
        self._client = InferenceClient(address, auth_token=auth_token, tls_ca=tls_ca, tls=tls, timeout=timeout)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency),
                                                           thread_name_prefix="jaxinfer-eval")
        mi = self._client.model_info(timeout=timeout)
        probe = self._client.tokenize("a")
        plain = self._client.tokenize("a", add_bos=False)
        add_bos = len(probe) > len(plain)
        self.info = ModelInfo(
            model=mi.model, server=address, dtype=mi.dtype, mesh=mi.mesh, slots=mi.slots, max_len=mi.max_len,
            config={"architecture": mi.architecture, "vocab_size": mi.vocab_size, "version": mi.version},
            add_bos=add_bos, bos_id=int(probe[0]) if add_bos else None,
            eos_ids=tuple(int(i) for i in mi.eos_token_ids),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self._client.tokenize(text, add_bos=add_bos)

    def score_tokens(self, pairs, progress=None) -> list[TokenScore]:
        bos = self.info.bos_id

        def one(pair) -> TokenScore:
            ctx, cont = list(pair[0]), list(pair[1])
            ctx_text = self._client.detokenize(ctx[1:] if self.info.add_bos and ctx[:1] == [bos] else ctx)
            resp = self._client.score(ctx_text, [self._client.detokenize(cont)])
            s = resp.scores[0]
            out = ScoreOutput(s.logprob, tuple(s.token_logprobs), s.is_greedy, tuple(resp.context_token_ids),
                              tuple(s.token_ids))
            return TokenScore(out, exact=list(resp.context_token_ids) == ctx and list(s.token_ids) == cont)

        return self._map(one, pairs, progress, lambda r: len(r.output.continuation_ids))

    def score_texts(self, pairs, progress=None) -> list[ScoreOutput]:
        # one Score call per distinct context, with all its continuations (up to 64 per call)
        groups: dict[str, list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(ctx, []).append(i)
        calls = [(ctx, idx[o : o + 64]) for ctx, idx in groups.items() for o in range(0, len(idx), 64)]

        def one(call):
            ctx, idx = call
            resp = self._client.score(ctx, [pairs[i][1] for i in idx])
            return [
                (i, ScoreOutput(s.logprob, tuple(s.token_logprobs), s.is_greedy, tuple(resp.context_token_ids),
                                tuple(s.token_ids)))
                for i, s in zip(idx, resp.scores)
            ]

        out: list[ScoreOutput | None] = [None] * len(pairs)
        for rows in self._map(one, calls, progress, lambda rows: sum(len(s.continuation_ids) for _, s in rows)):
            for i, s in rows:
                out[i] = s
        return out  # type: ignore[return-value]

    def generate(self, prompts, options, progress=None) -> list[Generation]:
        def one(item) -> Generation:
            p, opt = item
            req = generate_request(
                p.text, messages=p.messages, max_tokens=opt.max_tokens, temperature=opt.temperature, top_k=opt.top_k,
                top_p=opt.top_p, min_p=opt.min_p, repetition_penalty=opt.repetition_penalty,
                presence_penalty=opt.presence_penalty, frequency_penalty=opt.frequency_penalty, seed=opt.seed,
                stop=list(opt.stop), ignore_eos=opt.ignore_eos,
            )
            text, toks, last = [], [], None
            for resp in self._client.generate(req):
                text.append(resp.text)
                toks.extend(resp.token_ids)
                last = resp
            return Generation("".join(text), tuple(toks), last.usage.prompt_tokens if last else 0,
                              (last.finish_reason if last else "") or "length")

        return self._map(one, list(zip(prompts, options)), progress, lambda g: len(g.token_ids))

    def _map(self, fn, items, progress, count):
        futures = [self._pool.submit(fn, it) for it in items]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            if progress:
                progress(count(r))
        return results


__all__ = [
    "Backend",
    "EngineBackend",
    "ServerBackend",
    "ModelInfo",
    "GenerationOptions",
    "Generation",
    "Prompt",
    "TokenScore",
]
