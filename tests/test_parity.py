"""Logits parity with Hugging Face transformers (PyTorch, CPU, float32).

Random small configs of each family are built in transformers, saved as
safetensors, converted with ``jaxinfer convert``'s code path, restored from
Orbax, and compared: whole-model logits and per-layer hidden states (the one
forward, without a cache), then greedy generation through the compiled engine
(paged prefill + decode) against transformers' own incremental decoding.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

from jaxinfer.checkpoint import convert, load_checkpoint
from jaxinfer.engine.engine import Engine, EngineConfig
from jaxinfer.model.transformer import Transformer, rms_norm
from tests.helpers.drive import drive
from tests.helpers.reference import hf_greedy

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_attention_heads=4, max_position_embeddings=256)

CONFIGS = {
    "llama3": LlamaConfig(
        **SMALL, num_hidden_layers=3, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "qwen2": Qwen2Config(**SMALL, num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=24),
    # 7 layers: five local, one global, one local; prompts of 40 cross the 8-token window.
    "gemma3": Gemma3TextConfig(**SMALL, num_hidden_layers=7, num_key_value_heads=1, head_dim=32,
                               sliding_window=8, query_pre_attn_scalar=24),
}
SEQ = 40


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, converted checkpoint) for one family."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[request.param]).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d / "hf", safe_serialization=True)
    out = convert(d / "hf", d / "ckpt", "float32", progress=False)
    return request.param, hf, load_checkpoint(out)


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (2, n))


def test_logits_match(pair):
    name, hf, ckpt = pair
    toks = tokens(SEQ)
    with torch.no_grad():
        out = hf(torch.tensor(toks), output_hidden_states=True)
    model = Transformer(ckpt.config, params=ckpt.params)
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    hidden, _ = model(jnp.asarray(toks, jnp.int32), pos)
    logits = np.asarray(model.logits(hidden))
    ref = out.logits.numpy()
    assert np.abs(ref).max() > 1.0, "logits too flat to be a meaningful comparison"
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_per_layer_hidden_states(pair):
    """Each layer's output, to localise a mismatch: the model cut to its first n
    layers (its output passes the final norm) against transformers'
    hidden_states[n] passed through the same norm."""
    name, hf, ckpt = pair
    cfg = ckpt.config
    toks = tokens(SEQ, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor(toks), output_hidden_states=True).hidden_states
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    for n in range(1, cfg.num_layers):
        sub = dataclasses.replace(cfg, num_layers=n, layer_types=cfg.layer_kinds[:n])
        params = {**ckpt.params, "layers": {k: v[:n] for k, v in ckpt.params["layers"].items()}}
        model = Transformer(sub, params=params)
        h, _ = model(jnp.asarray(toks, jnp.int32), pos)
        expect = rms_norm(jnp.asarray(ref[n].numpy()), ckpt.params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)
        np.testing.assert_allclose(np.asarray(h), np.asarray(expect), atol=2e-4, rtol=0, err_msg=f"{name} layer {n - 1}")


@pytest.mark.slow  # compiles an engine per family; the logits and per-layer parity stay in the fast lane
def test_engine_greedy_matches_generate(pair):
    name, hf, ckpt = pair
    model = Transformer(ckpt.config, params=ckpt.params)
    eng = Engine(model, EngineConfig(max_seqs=2, max_len=128, page_size=8, prefill_buckets=(16, 64),
                                     kv_cache_bytes=1 << 20, lazy_compile=True))
    prompts = [list(map(int, tokens(n, seed=n)[0])) for n in (5, 33)]
    res = drive(eng, prompts, max_tokens=16)
    for p, r in zip(prompts, res):
        assert r["token_ids"] == hf_greedy(hf, p, 16), name
