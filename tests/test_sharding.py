"""A sharded engine gives the same tokens as a single-device one (8 virtual CPU devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.sharding import MeshShape, make_mesh, partition_spec


@pytest.fixture(scope="module")
def sharded_results() -> dict:
    root = str(Path(__file__).resolve().parents[1])  # this checkout's jaxinfer, whatever is installed
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.sharded_run"],
        capture_output=True, text=True, env=env, timeout=1500, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh process compiles six engines
@pytest.mark.parametrize("model", ["llama-tiny", "gemma-tiny"])
@pytest.mark.parametrize("mesh", ["data=2,model=4", "data=1,model=8"])
def test_sharded_equals_single_device(sharded_results, model, mesh):
    ref = sharded_results[f"{model} data=1,model=1"]
    got = sharded_results[f"{model} {mesh}"]
    assert got["tokens"] == ref["tokens"]
    for a, b in zip(got["logprobs"], ref["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # prefill_many (slots split over `data` on data=2) and the decode steps after it
    assert [t for t, _ in got["many"]] == [t for t, _ in ref["many"]]
    np.testing.assert_allclose([lp for _, lp in got["many"]], [lp for _, lp in ref["many"]], atol=1e-4)


@pytest.mark.slow
def test_shardings_are_really_split(sharded_results):
    # SmolLM2-shaped: 9 heads and 3 kv heads do not divide by 4: heads and the
    # pool replicate over `model`; decode rows split over `data`; the MLP splits
    # over `model`. The pool [layers, pages, page, kv_heads, head_dim] is never
    # split by page (every sequence may use any page).
    pool_spec, wq_spec, mlp_spec, rows_spec = sharded_results["llama-tiny data=2,model=4"]["shardings"]
    assert "model" not in pool_spec and "data" not in pool_spec
    assert "model" not in wq_spec and "'model'" in mlp_spec and "'data'" in rows_spec
    # Gemma-shaped on model=8: 4 heads and 1 kv head replicate, the MLP splits.
    pool_spec, wq_spec, mlp_spec, _ = sharded_results["gemma-tiny data=1,model=8"]["shardings"]
    assert "model" not in pool_spec and "'model'" in mlp_spec


def test_mesh_parsing_and_errors():
    assert MeshShape.parse("data=2,model=4") == MeshShape(2, 4)
    assert MeshShape.parse("model=2") == MeshShape(1, 2)
    with pytest.raises(ValueError, match="expected e.g."):
        MeshShape.parse("tensor=2")
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh("data=8,model=8")
    mesh = make_mesh("data=1,model=1")
    with pytest.raises(ValueError, match="not divisible"):
        partition_spec(("heads",), (9,), _FakeMesh(), strict=True, what="wq")
    assert partition_spec(("heads",), (9,), _FakeMesh(), what="wq") == partition_spec((None,), (9,), mesh)


class _FakeMesh:
    shape = {"data": 1, "model": 4}
