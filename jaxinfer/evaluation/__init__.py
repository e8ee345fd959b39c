"""Evaluation of a checkpoint: perplexity (sliding windows), multiple-choice accuracy and
generations, in process on an engine or against a running server.

* :mod:`.backend`    -- :class:`Backend`: :class:`EngineBackend` (in process) and :class:`ServerBackend` (gRPC)
* :mod:`.perplexity` -- the windows and the definition of perplexity and bits per byte
* :mod:`.choice`     -- multiple-choice accuracy (raw and length-normalised)
* :mod:`.generate`   -- prompts (JSONL) to generations (JSONL)
* :mod:`.results`    -- result JSON, tables, progress
* :mod:`.serving`    -- the serving benchmark (load generator and latency statistics for a server)

``jaxinfer eval`` and ``jaxinfer bench serve`` drive them; models open through :mod:`jaxinfer.loading`.
"""

from jaxinfer.evaluation.backend import (
    Backend,
    EngineBackend,
    Generation,
    GenerationOptions,
    ModelInfo,
    Prompt,
    ServerBackend,
    TokenScore,
)

__all__ = [
    "Backend",
    "EngineBackend",
    "ServerBackend",
    "ModelInfo",
    "Generation",
    "GenerationOptions",
    "Prompt",
    "TokenScore",
]
