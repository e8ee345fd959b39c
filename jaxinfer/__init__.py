"""jaxinfer: JAX/XLA-compiled LLM inference runtime.

``jaxinfer.load(model)`` gives an :class:`LLM` (generate, score, tokenizer) running the
continuous-batching scheduler in this process; see :mod:`jaxinfer.api`.
"""

from jaxinfer.api import LLM, Completion, load
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.engine.types import SamplingParams
from jaxinfer.version import __version__

__all__ = ["load", "LLM", "Completion", "Engine", "EngineConfig", "SamplingParams", "__version__"]
