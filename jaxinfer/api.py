"""The Python API: ``jaxinfer.load(model)`` -> :class:`LLM` (generate, score, tokenizer).

Generation runs through the continuous-batching :class:`~jaxinfer.scheduler.Scheduler` in this
process, the same loop that serves gRPC, so stop strings, min tokens, stop ids and logprobs mean
the same here as over the wire. Scoring goes through :meth:`Scheduler.score_batch` on that loop,
with the scoring tokenization of :func:`jaxinfer.tokenizer.tokenize_pair`.

    with jaxinfer.load("smollm2-135m-instruct") as llm:
        out = llm.generate(["The capital of France is"], jaxinfer.SamplingParams(), max_tokens=16, stop=["."])
        print(out[0].text, out[0].finish_reason)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

from jax.sharding import Mesh

from jaxinfer.engine.engine import Engine, EngineConfig, enable_compilation_cache
from jaxinfer.engine.types import SamplingParams, ScoreOutput, SlotToken
from jaxinfer.loading import DEFAULT_MODEL, build_engine, resolve
from jaxinfer.metrics import Metrics
from jaxinfer.scheduler import Request, Scheduler, SchedulerLimits, Usage
from jaxinfer.tokenizer import Tokenizer, encode_chat, tokenize_pair

Prompt = Union[str, Sequence[int]]  # text, or token ids
ScorePair = Union[tuple[str, str], tuple[Sequence[int], Sequence[int]]]  # (context, continuation)

# In process the caller holds every request it submits, so the queue bounds that protect a
# server are set out of the way; stop strings get generous bounds for evaluation's `until`.
IN_PROCESS_LIMITS = SchedulerLimits(max_queue_requests=1 << 30, max_queue_tokens=1 << 50, max_stop_strings=64,
                                    max_stop_length=4096)


@dataclass(frozen=True)
class Completion:
    """One prompt's generation (the text ends before a matched stop string)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # stop | length
    logprobs: tuple[SlotToken, ...]  # one per generated token when asked (generate(logprobs=True)), else ()
    usage: Usage
    prompt_token_ids: tuple[int, ...] = ()


class LLM:
    """A model in this process: an engine, its tokenizer and the scheduler loop that drives it.
    Build it with :func:`load`, or from an :class:`Engine` you built. ``close()`` stops the loop."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None = None, *,
                 limits: SchedulerLimits = IN_PROCESS_LIMITS) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{engine.name}: the checkpoint carries no tokenizer (give one: tokenizer=...)")
        self._scheduler = Scheduler(engine, self.tokenizer, limits, metrics=Metrics()).start()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        max_tokens: int = 64,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        min_tokens: int = 0,
        ignore_eos: bool = False,
        logprobs: bool = False,
        chat: bool = False,
        progress: Callable[[Completion], None] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (text or token ids; a lone prompt needs no list), batched by the
        scheduler. ``sampling``:
        one for all prompts or one each (default greedy). ``max_tokens`` is clipped to the room the
        engine's ``max_len`` leaves after each prompt. ``chat``: each text prompt is a user message
        rendered with the chat template. ``progress`` is called with each completion, in order."""
        if isinstance(prompts, str) or (len(prompts) and all(isinstance(t, numbers.Integral) for t in prompts)):
            prompts = [prompts]  # one prompt: text, or a flat list of token ids
        prompts = list(prompts)
        if sampling is None:
            sampling = SamplingParams()
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"sampling: {len(params)} SamplingParams for {len(prompts)} prompts (give one or one each)")
        requests = [
            self.request(p, sp, max_tokens=max_tokens, stop=stop, stop_token_ids=stop_token_ids,
                         min_tokens=min_tokens, ignore_eos=ignore_eos, logprobs=logprobs, chat=chat, index=i)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        return self.run(requests, progress)

    def request(self, prompt: Prompt, sampling: SamplingParams = SamplingParams(), *, max_tokens: int = 64,
                stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), min_tokens: int = 0,
                ignore_eos: bool = False, logprobs: bool = False, chat: bool = False, index: int = 0) -> Request:
        """The scheduler :class:`Request` for one prompt, as :meth:`generate` builds it (``index``
        names the prompt in errors). For callers whose prompts differ in more than sampling."""
        if isinstance(prompt, str):
            ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}]) if chat \
                else self.tokenizer.encode(prompt)
        elif chat:
            raise ValueError(f"prompts[{index}]: chat=True takes text prompts, not token ids")
        else:
            ids = [int(t) for t in prompt]
        room = self._scheduler.max_len - len(ids)
        if room < 1:
            raise ValueError(f"prompts[{index}] has {len(ids)} tokens: the engine's max_len={self._scheduler.max_len} "
                             "leaves no room to generate")
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        return Request(tuple(ids), min(max_tokens, room), sampling, min_tokens=min_tokens, stop=tuple(stop),
                       stop_token_ids=tuple(int(t) for t in stop_token_ids), ignore_eos=ignore_eos,
                       return_logprobs=logprobs or sampling.logprobs > 0)

    def run(self, requests: Sequence[Request], progress: Callable[[Completion], None] | None = None,
            ) -> list[Completion]:
        """Submit every request at once (the scheduler batches them) and wait for all; ``progress``
        is called with each completion, in order. A failed request raises RuntimeError."""
        streams = []
        try:
            for req in requests:
                streams.append(self._scheduler.submit(req))
            out = []
            for req, stream in zip(requests, streams):
                out.append(_collect(req, stream))
                if progress is not None:
                    progress(out[-1])
            return out
        except BaseException:
            for stream in streams:  # free the slots of the requests still running
                stream.cancel()
            raise

    def score(self, pairs: Sequence[ScorePair], *, timeout: float | None = None) -> list[ScoreOutput]:
        """log p(continuation | context) for each pair: texts (tokenized by
        :func:`jaxinfer.tokenizer.tokenize_pair`) or token-id lists."""
        ids = [
            tokenize_pair(self.tokenizer, c, x, self.engine.cfg.bos_token_id) if isinstance(c, str) else (c, x)
            for c, x in pairs
        ]
        return self._scheduler.score_batch(ids, timeout)

    def close(self) -> None:
        """Stop the scheduler loop (the engine stays usable for another LLM)."""
        self._scheduler.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _collect(req: Request, stream) -> Completion:
    text, ids, lps, last = [], [], [], None
    for ev in stream:
        text.append(ev.text)
        ids.extend(ev.token_ids)
        lps.extend(ev.logprobs)
        last = ev
    if last is None or last.finish_reason not in ("stop", "length"):
        reason = last.finish_reason if last is not None else "no events"
        raise RuntimeError(f"generation failed: {reason}: {last.message if last is not None else ''}")
    return Completion("".join(text), tuple(ids), last.finish_reason, tuple(lps), last.usage, req.prompt_ids)


def load(
    model: str | Path = DEFAULT_MODEL,
    *,
    engine: EngineConfig | None = None,
    mesh: Mesh | str | None = None,
    dtype: str | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    model_config: str | Path | None = None,
    step: int | None = None,
) -> LLM:
    """An :class:`LLM` for ``model``: what ``--model`` takes (a built-in name, a GGUF file, a
    Hugging Face directory, a converted checkpoint directory; or a training run's Orbax directory
    with ``model_config`` and ``tokenizer``). ``engine`` defaults to ``EngineConfig(lazy_compile=True)``
    (programs compile on first use); ``mesh`` as ``"data=2,model=4"``."""
    enable_compilation_cache()
    source = resolve(model, dtype=dtype, model_config=model_config, step=step)
    built = build_engine(source, engine or EngineConfig(lazy_compile=True), mesh=mesh, dtype=dtype, tokenizer=tokenizer)
    return LLM(built)


__all__ = ["load", "LLM", "Completion", "IN_PROCESS_LIMITS"]
