"""Code the test modules share (none of it is a test):

* ``fakes``: the hand-computable fake engine and tokenizer the scheduler and server tests run on;
* ``tiny``: tiny model and engine configs, random models, the tiny BPE checkpoint's parts;
* ``served``: an in-process gRPC server over the fake engine;
* ``reference``: transformers (PyTorch CPU) as the reference implementation;
* ``sharded_run``, ``multihost_worker``: entry points that tests run in a fresh process
  (``python -m tests.helpers.sharded_run`` from the repository root).
"""

from __future__ import annotations

import time


def wait_for(cond, timeout: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.002)
