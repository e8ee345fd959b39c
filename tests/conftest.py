"""Shared fixtures. Shared code that is not a fixture lives in ``tests/helpers/``.

* ``smollm2_dir`` / ``gemma3_dir``: converted checkpoint directories (float32) of the built-in
  real models; ``jaxinfer.json`` in each records the GGUF it came from. They are converted into
  ``$JAXINFER_CACHE`` when set (and reused across sessions), else into a per-session temporary
  directory. Tests using them are marked ``real``.
* ``hf_from_gguf``: transformers' model loaded from such a directory's GGUF (the reference),
  once per session.
* ``tiny_ckpt`` / ``tiny_engine``: the tiny random Llama with a real BPE tokenizer, saved as a
  converted checkpoint once per session, and an engine over it.

Markers: ``real`` (a registry model), ``slow`` (more than a few seconds on 2 CPU cores); the fast
lane is ``python -m pytest -m "not slow and not real"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxinfer.checkpoint import resolve_model, save_checkpoint
from jaxinfer.engine.engine import Engine
from jaxinfer.loading import build_engine
from tests.helpers.http_fakes import HttpFakeDetokenizer, HttpFakeEngine, HttpFakeTokenizer
from tests.helpers.tiny import BPE_ENGINE, BPE_TINY, bpe_tokenizer, bpe_weights


REAL_MODEL_FIXTURES = frozenset({"smollm2_dir", "gemma3_dir"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a registry model is marked ``real`` whether or not its author said so."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("JAXINFER_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("jaxinfer-cache")


def _resolve(name: str, cache: Path) -> Path:
    try:
        return resolve_model(name, cache_dir=cache)
    except ValueError as e:  # package not installed: say how to install it
        if "pip install" in str(e):
            pytest.skip(str(e))
        raise


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir: Path) -> Path:
    return _resolve("smollm2-135m-instruct", model_cache_dir)


@pytest.fixture(scope="session")
def gemma3_dir(model_cache_dir: Path) -> Path:
    return _resolve("gemma3-270m", model_cache_dir)


@pytest.fixture(scope="session")
def hf_from_gguf():
    """``hf_from_gguf(ckpt_dir)``: the reference model for a converted real checkpoint."""
    from tests.helpers.reference import HFModels  # torch + transformers: only the tests that compare load them

    return HFModels()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted checkpoint directory: tiny random Llama + BPE tokenizer that adds BOS."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", BPE_TINY, bpe_weights(), bpe_tokenizer(True),
                           progress=False)


@pytest.fixture(scope="module")
def tiny_engine(tiny_ckpt: Path) -> Engine:
    return build_engine(tiny_ckpt, BPE_ENGINE)


@pytest.fixture
def http_fakes():
    """The fake tokenizer / detokenizer / engine classes for HTTP tests."""
    return SimpleNamespace(Tokenizer=HttpFakeTokenizer, Detokenizer=HttpFakeDetokenizer, Engine=HttpFakeEngine)
