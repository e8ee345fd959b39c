"""The engine benchmark's matmul floor: the program it times must hold every
weight matmul of a decode step, on the engine's own buffers, and nothing that
is not a weight matmul's work (attention, cache, sampling)."""

from __future__ import annotations

import math

import pytest

from jaxinfer.engine.engine import Engine, EngineConfig
from scripts import bench_engine
from tests.helpers.tiny import GEMMA_TINY, LLAMA_TINY, make_model


@pytest.mark.parametrize("cfg", [LLAMA_TINY, GEMMA_TINY], ids=["llama", "gemma3"])
def test_matmul_floor_holds_every_weight_matmul_and_no_attention(cfg):
    eng = Engine(make_model(cfg), EngineConfig(slots=2, max_len=64, prefill_buckets=(16,), lazy_compile=True))
    batch = 3
    f, args = bench_engine.matmul_floor_program(eng, batch)
    text = f.lower(*args).as_text()
    fused_qkv = "wqkv_t" in eng.params[1][0]
    per_layer = (1 if fused_qkv else 3) + 3  # q/k/v, o, gate/up, down
    assert text.count("stablehlo.dot_general") == cfg.num_layers * per_layer + 1  # + the LM head
    # each weight matmul contracts a weight of the engine's with [features, batch] activations
    for p in eng.params[1]:
        for name in ("wo_t", "w_gate_up_t", "w_down_t"):
            assert f"tensor<{'x'.join(map(str, p[name].shape))}xf32>" in text
    # nothing reads the KV cache or samples (attention would add dots above): no top-k, no cache-shaped tensor
    assert "top_k" not in text and "sort" not in text
    cache_block = eng.state.cache.k[0][0].shape
    assert f"tensor<{'x'.join(map(str, cache_block))}xf32>" not in text

    seconds = bench_engine.matmul_floor(eng, batch, steps=2)
    assert math.isfinite(seconds) and 0 < seconds < 5
