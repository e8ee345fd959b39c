"""lm-evaluation-harness backend: the model ``jaxinfer``, in process or against a server.

lm-eval only knows models whose module was imported (it has no plugin entry points), so:

* from Python: ``import jaxinfer.lm_eval_backend`` and then ``lm_eval.simple_evaluate(model="jaxinfer",
  model_args="model=smollm2-135m-instruct,max_len=1024", tasks=[...])``, or pass a
  :class:`JaxinferLM` instance as ``model``;
* from the shell: ``python -m jaxinfer.lm_eval_backend`` is lm-eval's own command line with the
  model registered, e.g. ``python -m jaxinfer.lm_eval_backend --model jaxinfer --model_args
  model=smollm2-135m-instruct,mesh=1x4 --tasks arc_easy`` (``--include_path DIR`` for local task YAMLs).

``model_args``: ``model`` (anything ``--model`` takes) or ``server=HOST:PORT``; ``mesh`` as
``DATAxMODEL`` (``2x4``) or ``data:2;model:4`` (lm-eval splits model_args at commas); ``dtype``,
``max_seqs``, ``max_len``, ``kv_cache_memory`` (e.g. ``512MiB``), ``model_config``/``step``/``tokenizer`` (training runs),
``auth_token_file``, ``concurrency``, ``max_gen_toks`` (default 256), ``window``/``stride`` (rolling
windows; default max_len and max_len / 2) and ``rolling_prefix``.

Semantics:

* ``loglikelihood(context, continuation)``: exactly ``jaxinfer score`` (context tokenized with BOS
  when the model adds one, continuation tokenized on its own and appended; an empty context
  becomes [BOS], else [EOS]). lm-eval's Hugging Face backend instead tokenizes context +
  continuation together and splits; the two agree whenever the boundary is a token boundary.
* ``loglikelihood_rolling(text)``: minus the NLL of :mod:`jaxinfer.evaluation.perplexity`, i.e. every
  token after the first, with sliding windows. ``rolling_prefix=eos`` puts the end-of-sequence
  token in front of texts of models that add no BOS, so their first token is scored too (lm-eval's
  Hugging Face convention); the default (``first``) leaves the first token as context only.
* ``generate_until(context, gen_kwargs)``: the scheduler's generation with ``until`` as stop
  strings, ``max_gen_toks``, and ``temperature``/``top_p``/``top_k`` when ``do_sample``; greedy
  otherwise.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval registers its own models on this import)
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from tqdm.auto import tqdm

from jaxinfer.client import read_token_file
from jaxinfer.engine.config import EngineConfig, parse_size
from jaxinfer.engine.engine import enable_compilation_cache
from jaxinfer.evaluation.backend import Backend, EngineBackend, GenerationOptions, Prompt, ServerBackend
from jaxinfer.evaluation.perplexity import evaluate_perplexity
from jaxinfer.loading import DEFAULT_MODEL, build_engine, resolve

log = logging.getLogger(__name__)


def parse_mesh(value: Any) -> str | None:
    """``2x4`` -> ``data=2,model=4``; ``data:2;model:4`` -> ``data=2,model=4``; None/'' -> None."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if m:
        return f"data={m.group(1)},model={m.group(2)}"
    return text.replace(";", ",").replace(":", "=")


class JaxinferLM(LM):
    def __init__(
        self,
        model: str | None = None,
        server: str | None = None,
        *,
        mesh: Any = None,
        dtype: str | None = None,
        max_seqs: int = 8,
        max_len: int = 2048,
        kv_cache_memory: str | None = None,
        model_config: str | None = None,
        step: int | None = None,
        tokenizer: str | None = None,
        auth_token_file: str | None = None,
        concurrency: int = 16,
        max_gen_toks: int = 256,
        window: int | None = None,
        stride: int | None = None,
        rolling_prefix: str = "first",
        backend: Backend | None = None,
        batch_size: Any = None,  # lm-eval passes these; batching is the engine's
        max_batch_size: Any = None,
        device: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            log.warning("jaxinfer lm-eval backend ignores model_args %s", sorted(unused))
        if rolling_prefix not in ("first", "eos"):
            raise ValueError(f"rolling_prefix={rolling_prefix!r}: expected 'first' or 'eos'")
        if backend is None:
            if server:
                token = read_token_file(auth_token_file) if auth_token_file else None
                backend = ServerBackend(str(server), auth_token=token, concurrency=int(concurrency))
            else:
                model = str(model or DEFAULT_MODEL)
                enable_compilation_cache()
                source = resolve(model, dtype=dtype, model_config=model_config, step=None if step is None else int(step))
                engine = build_engine(source, EngineConfig(
                    max_seqs=int(max_seqs), max_len=int(max_len), lazy_compile=True,
                    kv_cache_bytes=parse_size(kv_cache_memory) if kv_cache_memory else None),
                                      mesh=parse_mesh(mesh), dtype=dtype, tokenizer=tokenizer)
                backend = EngineBackend(engine, model=model, checkpoint=source.path, step=source.step)
        self.backend = backend
        self.max_gen_toks = int(max_gen_toks)
        self.window = int(window) if window else None
        self.stride = int(stride) if stride else None
        self.rolling_prefix = rolling_prefix

    # -- lm-eval's interface -------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        with _bar(len(pairs), "loglikelihood", disable_tqdm) as bar:
            scores = self.backend.score_texts(pairs)
            bar(len(pairs))
        out = []
        for pair, s in zip(pairs, scores):
            res = (float(s.logprob), bool(s.is_greedy))
            self.cache_hook.add_partial("loglikelihood", pair, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [(str(i), r.args[0]) for i, r in enumerate(requests)]
        info = self.backend.info
        prefix = None
        if self.rolling_prefix == "eos" and not info.add_bos:
            if not info.eos_ids:
                raise ValueError("rolling_prefix=eos: the model has no end-of-sequence token")
            prefix = info.eos_ids[0]
        with _bar(len(docs), "loglikelihood_rolling", disable_tqdm) as bar:
            results = evaluate_perplexity(self.backend, docs, window=self.window, stride=self.stride,
                                          prefix_id=prefix)
            bar(len(docs))
        out = []
        for r, d in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), -d.nll)
            out.append(-d.nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, options = [], []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            sample = bool(kwargs.pop("do_sample", False))
            opt = GenerationOptions(
                max_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
                top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0,
                seed=int(kwargs["seed"]) if "seed" in kwargs else None,
                stop=tuple(str(u) for u in until if u),
            )
            prompts.append(Prompt(text=context))
            options.append(opt)
        with _bar(len(prompts), "generate_until", disable_tqdm) as bar:
            gens = self.backend.generate(prompts, options)
            bar(len(prompts))
        out = []
        for r, g in zip(requests, gens):
            self.cache_hook.add_partial("generate_until", r.args, g.text)
            out.append(g.text)
        return out

    # -- lm-eval metadata ------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.backend.info.model.replace("/", "__")

    def get_model_info(self) -> dict:
        i = self.backend.info
        return {"model": i.model, "checkpoint": i.checkpoint, "step": i.step, "server": i.server, "dtype": i.dtype,
                "mesh": i.mesh, "max_len": i.max_len}

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None:
            raise NotImplementedError("chat templates are applied in process only (not against a server)")
        return tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


class _bar:
    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self._bar = tqdm(total=total, desc=f"jaxinfer {desc}", disable=disable)

    def __enter__(self):
        return self._bar.update

    def __exit__(self, *exc) -> None:
        self._bar.close()


def register() -> None:
    """Register :class:`JaxinferLM` as ``jaxinfer`` (once; lm-eval's own models stay available)."""
    if "jaxinfer" not in model_registry:
        register_model("jaxinfer")(JaxinferLM)


def main() -> None:
    """lm-eval's command line with the ``jaxinfer`` model registered."""
    register()
    cli_evaluate()


if __name__ == "__main__":
    import jaxinfer.lm_eval_backend as _canonical  # register the importable class, not __main__'s copy

    _canonical.main()
else:
    register()
