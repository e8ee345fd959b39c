"""Run by test_sharding.py in a fresh process with 8 virtual CPU devices
(``python -m tests.helpers.sharded_run`` from the repository root): greedy tokens and top
logprobs of the same engine on several meshes, as JSON."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.engine.types import SamplingParams  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402
from tests.helpers.scheduled import generate  # noqa: E402
from tests.helpers.tiny import ENGINE_CFG, GEMMA_TINY, LLAMA_TINY, make_model, prompt_of  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
out = {}
for cfg in (LLAMA_TINY, GEMMA_TINY):
    for mesh in ("data=1,model=1", "data=2,model=4", "data=1,model=8"):
        eng = Engine(make_model(cfg), ENGINE_CFG, mesh=make_mesh(mesh))
        eng.compile(progress=False)
        prompts = [prompt_of(n, seed=n) for n in (5, 40, 17)]
        res = generate(eng, prompts, [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=3)],
                       max_tokens=12, ignore_eos=True)
        # three short prompts in one prefill call (a padding row writes to no slot), then 3 steps
        items = [(i, prompt_of(n, seed=50 + n), SamplingParams(temperature=0.7 * i, seed=i, logprobs=2))
                 for i, n in enumerate((3, 16, 9))]
        many = [[t.token, t.logprob] for t in eng.prefill_many(items)]
        for _ in range(3):
            many += [[t.token, t.logprob] for t in eng.decode([0, 1, 2]).result().values()]
        for i in range(3):
            eng.release(i)
        layer0 = eng.params[1][0]
        shard = [str(x.sharding.spec) for x in (eng.state.cache.k[0][0], layer0.get("wq_t", layer0.get("wqkv_t")), layer0["w_gate_up_t"])]
        out[f"{cfg.name} {mesh}"] = {"tokens": [r["token_ids"] for r in res],
                                     "logprobs": [r["logprobs"] for r in res], "shardings": shard, "many": many}
print(json.dumps(out))
