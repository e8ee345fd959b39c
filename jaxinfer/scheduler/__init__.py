"""Continuous batching over a paged KV cache (host only, no jax).

:mod:`.loop` holds the :class:`Scheduler` and its module docstring tells the whole pipeline;
:mod:`.requests` what goes in and out; :mod:`.validation` the submit-time checks; :mod:`.scoring`
log-likelihoods through pages; :mod:`.state` the loop's per-request bookkeeping.
"""

from jaxinfer.scheduler.loop import Scheduler
from jaxinfer.scheduler.requests import (
    FINISH_REASONS,
    DetokenizerLike,
    Event,
    InvalidRequestError,
    Load,
    NotAcceptingError,
    QueueFullError,
    Request,
    RequestStream,
    SchedulerLimits,
    StopStringMatcher,
    Timings,
    TokenizerLike,
    Usage,
)

__all__ = [
    "FINISH_REASONS", "DetokenizerLike", "Event", "InvalidRequestError", "Load", "NotAcceptingError",
    "QueueFullError", "Request", "RequestStream", "Scheduler", "SchedulerLimits", "StopStringMatcher", "Timings",
    "TokenizerLike", "Usage",
]
