"""Run by test_kv_int8.py in a fresh process with 8 virtual CPU devices
(``python -m tests.helpers.sharded_kv_int8`` from the repository root): greedy tokens and
log-probs of Llama-tiny on an int8 KV pool, on one device and with its 3 kv heads split over
``model=3`` (the pool and its scales split), as JSON."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

from jaxinfer.engine.engine import Engine  # noqa: E402
from jaxinfer.engine.types import SamplingParams  # noqa: E402
from jaxinfer.sharding import make_mesh  # noqa: E402
from tests.helpers.drive import drive  # noqa: E402
from tests.helpers.tiny import LLAMA_TINY, engine_config, make_model, prompt_of  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
out = {}
model = make_model(LLAMA_TINY)
for mesh in ("data=1,model=1", "data=2,model=3"):
    eng = Engine(model, engine_config(LLAMA_TINY, cache_dtype="int8", lazy_compile=True), mesh=make_mesh(mesh))
    prompts = [prompt_of(n, seed=n) for n in (5, 40, 17)]
    res = drive(eng, prompts, [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=3)],
                max_tokens=10)
    out[mesh] = {"tokens": [r["token_ids"] for r in res], "logprobs": [r["logprobs"] for r in res],
                 "shardings": [str(x.sharding.spec) for x in (eng.pool.k, eng.pool.k_scale)]}
print(json.dumps(out))
