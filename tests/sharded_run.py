"""Run by test_sharding.py in a fresh process with 8 virtual CPU devices:
greedy tokens and top logprobs of the same engine on several meshes, as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import PageAllocator, drive  # noqa: E402
from test_engine import GEMMA_TINY, LLAMA_TINY, engine_config, make_model, prompt_of  # noqa: E402

from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.engine.types import SamplingParams  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
out = {}
for cfg in (LLAMA_TINY, GEMMA_TINY):
    for mesh in ("data=1,model=1", "data=2,model=4", "data=1,model=8"):
        eng = Engine(make_model(cfg), engine_config(cfg, lazy_compile=True), mesh=make_mesh(mesh))
        prompts = [prompt_of(n, seed=n) for n in (5, 40, 17)]
        res = drive(eng, prompts, [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=3)],
                    max_tokens=12)
        # three short prompts in one prefill call (a padding piece writes to no row), then 3 steps
        alloc = PageAllocator(eng.num_pages, seed=4)
        tables = {i: alloc.take(4) for i in range(3)}
        items = [(i, prompt_of(n, seed=50 + n), SamplingParams(temperature=0.7 * i, seed=i, logprobs=2), 0, tables[i])
                 for i, n in enumerate((3, 16, 9))]
        many = [[t.token, t.logprob] for t in eng.prefill_many(items)]
        for _ in range(3):
            many += [[t.token, t.logprob] for t in eng.decode([0, 1, 2], tables).result().values()]
        for i in range(3):
            eng.release(i)
        shard = [str(x.sharding.spec) for x in (eng.pool.k, eng.params["layers"]["wq"][...],
                                                 eng.params["layers"]["w_gate"][...], eng.state.counts)]
        out[f"{cfg.name} {mesh}"] = {"tokens": [r["token_ids"] for r in res],
                                     "logprobs": [r["logprobs"] for r in res], "shardings": shard, "many": many}
print(json.dumps(out))
