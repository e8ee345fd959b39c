"""A short run of the soak (``scripts/soak.py``) on the real engine: one ``jaxinfer serve`` of
SmolLM2 as a subprocess, mixed gRPC and HTTP clients with cancels, deadlines, disconnects, bad
inputs and Score calls, a KV pool small enough to preempt; every check of the script must pass.
The full soak is ``python scripts/soak.py`` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from scripts.soak import Config, print_report, soak

pytestmark = [pytest.mark.slow, pytest.mark.real]


def test_a_short_soak_on_smollm2_passes_every_check(smollm2_dir, tmp_path):
    # pages of 8 in a pool of about two dozen: a sequence outgrows the one page of headroom
    # admission leaves it within a few tokens, so even short outputs preempt
    cfg = Config(model=str(smollm2_dir), requests=18, rounds=2, concurrency=10, seed=3, max_tokens=16, page_size=8,
                 kv_cache_memory="8MiB", replay_max=8, progress=False, log_path=str(tmp_path / "serve.log"))
    report = soak(cfg)
    print_report(report)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    assert report["replayed"] > 0 and report["preemptions"] > 0
    kinds = {key.split("/")[0] for key in report["counts"]}
    assert kinds >= {"greedy", "bad", "score"}, kinds  # the mix really was mixed
