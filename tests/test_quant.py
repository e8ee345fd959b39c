"""Quantized weights (int8 per channel, int4 per group): the arithmetic against the float
weights they stand for, the declarations, and the engine serving them against its plain path."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.checkpoint import load_checkpoint, save_checkpoint
from jaxinfer.engine.engine import Engine, param_bytes
from jaxinfer.engine.types import SamplingParams
from jaxinfer.model import quant as qt
from jaxinfer.model.transformer import Transformer, params_tree
from jaxinfer.model.weights import INT4_GROUP, INT8_UNDER_INT4, WeightSpec, flatten, nest, weight_specs
from tests.helpers.drive import PageAllocator, drive, score_direct
from tests.helpers.tiny import LLAMA_TINY, engine_config, make_model, prompt_of

# LLAMA_TINY with every contracted axis a multiple of the int4 group
LLAMA_Q = dataclasses.replace(LLAMA_TINY, name="llama-q", hidden_size=64, head_dim=32)

rng = np.random.default_rng(0)

# (einsum, weight spec (layer slice), x shape): every way the model contracts a projection
CASES = {
    "wq": ("btd,dhk->bthk", WeightSpec((64, 3, 32), ("embed", "heads", "head_dim"), contract=(0,)), (2, 5, 64)),
    "wo": ("bthk,hkd->btd", WeightSpec((3, 32, 64), ("heads", "head_dim", "embed"), contract=(0, 1)), (2, 5, 3, 32)),
    "tied": ("...d,vd->...v", WeightSpec((96, 64), ("vocab", "embed"), contract=(1,)), (3, 64)),
    "lm_head": ("...d,dv->...v", WeightSpec((64, 96), ("embed", "vocab"), contract=(0,)), (1, 1, 64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_qdot_is_the_matmul_by_the_dequantized_weight(case, fmt):
    eq, spec, xshape = CASES[case]
    w = jnp.asarray(rng.standard_normal(spec.shape, np.float32))
    x = jnp.asarray(rng.standard_normal(xshape, np.float32))
    values, scale, *minimum = qt.quantize(w, spec, fmt)
    minimum = minimum[0] if minimum else None
    deq = qt.dequantize(values, scale, spec.contract, fmt, minimum=minimum)
    # every element within half a quantization step of the float weight
    step = scale if fmt == "int8" else jnp.repeat(scale.astype(jnp.float32), INT4_GROUP, axis=spec.contract[-1])
    assert bool(jnp.all(jnp.abs(deq - w) <= step * (0.5 if fmt == "int8" else 0.51) + 1e-5))  # int4: float16 scales
    want = jnp.einsum(eq, x, deq)
    got = qt.qdot(x, values, scale, spec.contract, fmt, matmul="weight-only", minimum=minimum)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    if fmt == "int8":
        # w8a8: exactly the matmul of the per-token quantized activations by the weight
        n = len(spec.contract)
        xq, xs = qt.quantize_rows(x.reshape(-1, int(np.prod(xshape[-n:]))))
        x_deq = (xq.astype(jnp.float32) * xs).reshape(xshape)
        for rows in (1, 8):
            got = qt.qdot(x, values, scale, spec.contract, fmt, matmul="w8a8", rows=rows)
            np.testing.assert_allclose(got, jnp.einsum(eq, x_deq, deq), rtol=1e-4, atol=1e-3)


def test_int4_reproduces_an_affine_4bit_grid_exactly():
    """Weights already on a 16-level grid per group (GGUF Q4_1 / Q4_K blocks) survive int4 exactly."""
    spec = CASES["wq"][1]
    q = rng.integers(0, 16, spec.shape)
    q[:INT4_GROUP:2], q[1:INT4_GROUP:2] = 0, 15  # every group spans the whole grid
    q[INT4_GROUP:2 * INT4_GROUP:2], q[INT4_GROUP + 1:2 * INT4_GROUP:2] = 0, 15
    # float16 scales and minimums, as GGUF's blocks hold them
    d = rng.uniform(0.01, 0.1, (2, 1, 3, 32)).repeat(INT4_GROUP, 1).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.5, 0, (2, 1, 3, 32)).repeat(INT4_GROUP, 1).astype(np.float16).astype(np.float32)
    w = jnp.asarray(q.reshape(2, INT4_GROUP, 3, 32) * d + m).reshape(spec.shape)
    values, scale, minimum = qt.quantize(w, spec, "int4")
    np.testing.assert_allclose(qt.dequantize(values, scale, spec.contract, "int4", minimum=minimum), w, atol=1e-6)


def test_int4_packing_round_trips_every_value():
    q = jnp.asarray(np.tile(np.arange(16, dtype=np.uint8), (3, 4)))  # [3, 64]
    packed = qt.pack_int4(q, 1)
    assert packed.shape == (3, 32) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(qt.unpack_int4(packed, 1), q)
    np.testing.assert_array_equal(qt.unpack_int4(qt.pack_int4(q.T, 0), 0), q.T)


def test_quantized_declarations():
    float_specs, q8, q4 = (weight_specs(LLAMA_Q, f) for f in (None, "int8", "int4"))
    projections = [n for n, s in float_specs.items() if s.contract]
    assert set(projections) == {"embed", "layers/wq", "layers/wk", "layers/wv", "layers/wo", "layers/w_gate",
                                "layers/w_up", "layers/w_down"}  # tied embeddings: no lm_head
    for name in projections:
        f = float_specs[name]
        assert q8[name].dtype == "int8" and q8[name].shape == f.shape
        assert q8[f"{name}_scale"].shape == tuple(1 if i in f.contract else d for i, d in enumerate(f.shape))
        last = f.contract[-1]
        if name in INT8_UNDER_INT4:
            assert q4[name] == q8[name] and f"{name}_min" not in q4
            continue
        assert q4[name].dtype == "uint8" and q4[name].shape[last] * 2 == f.shape[last]
        assert q4[f"{name}_scale"].shape[last] * INT4_GROUP == f.shape[last] == q4[f"{name}_min"].shape[last] * 32
        assert q4[f"{name}_scale"].dtype == q4[f"{name}_min"].dtype == "float16"
    assert float_specs["final_norm"] == q8["final_norm"] == q4["final_norm"]
    with pytest.raises(ValueError, match="multiple of 32"):
        weight_specs(LLAMA_TINY, "int4")  # hidden 72


def quantized_params(cfg, fmt, seed=0) -> dict:
    flat, specs = flatten(params_tree(make_model(cfg, seed))), weight_specs(cfg)
    out = {}
    for name, a in flat.items():
        out.update(qt.quantize_weight(name, a, specs[name], fmt) if specs[name].contract else {name: a})
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_forward_close_to_float(fmt):
    """Quantization error on the whole forward stays small (random weights: no
    outliers to protect), and the two int8 matmuls agree with each other."""
    m = make_model(LLAMA_Q)
    tokens = jnp.asarray(rng.integers(3, 500, (2, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ref = jax.nn.log_softmax(m.logits(m(tokens, pos)[0]))
    got = {}
    for mm in ("w8a8", "weight-only"):
        qm = Transformer(LLAMA_Q, params=nest(quantized_params(LLAMA_Q, fmt)), matmul=mm, int8_rows=8)
        assert qm.quant == fmt
        got[mm] = jax.nn.log_softmax(qm.logits(qm(tokens, pos)[0]))
    bound = {"int8": 0.05, "int4": 0.6}[fmt]  # mean |log p - log p_float| over the vocabulary
    for mm, lp in got.items():
        assert float(jnp.mean(jnp.abs(lp - ref))) < bound, mm
        assert float(jnp.mean(jnp.abs(lp - ref))) > 0  # the quantized weights are really used


@pytest.fixture(scope="module")
def engines():
    """The same random model served plain and with int8 weights (w8a8: this CPU's default)."""
    model = make_model(LLAMA_Q)
    plain = Engine(model, engine_config(LLAMA_Q, lazy_compile=True))
    q8 = Engine(model, engine_config(LLAMA_Q, lazy_compile=True, quantize="int8"))
    return plain, q8


def test_engine_quantizes_at_load(engines):
    plain, q8 = engines
    assert plain.quant is None and q8.quant == "int8" and q8.matmul == "w8a8"
    assert q8.params["layers"]["wq"][...].dtype == jnp.int8
    assert "int8 projections (w8a8 matmuls)" in q8.describe()
    # projections at a quarter of float32's bytes, plus one float32 scale per output channel
    specs = weight_specs(LLAMA_Q)
    proj = sum(int(np.prod(s.shape)) for s in specs.values() if s.contract)
    other = sum(int(np.prod(s.shape)) for s in specs.values() if not s.contract)
    scales = sum(int(np.prod(s.shape)) for n, s in weight_specs(LLAMA_Q, "int8").items() if n.endswith("_scale"))
    assert param_bytes(plain) == 4 * (proj + other)
    assert param_bytes(q8) == proj + 4 * (other + scales)


def test_quantized_engine_equals_its_plain_forward(engines):
    """The int8 engine's greedy tokens and log-probs are those of the quantized model run
    directly, and close to the float engine's."""
    plain, q8 = engines
    prompt = prompt_of(20, seed=3)
    got = drive(q8, [prompt], max_tokens=6)[0]
    ref = drive(plain, [prompt], max_tokens=6)[0]
    qm = Transformer(LLAMA_Q, params=nest(quantized_params(LLAMA_Q, "int8")), matmul="w8a8", int8_rows=8)
    ids = prompt + got["token_ids"]
    tokens = jnp.asarray([ids], jnp.int32)
    lp = jax.nn.log_softmax(qm.logits(qm(tokens, jnp.arange(len(ids))[None])[0]))[0]
    direct = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(got["token_ids"])]
    assert [int(jnp.argmax(lp[len(prompt) - 1 + i])) for i in range(6)] == got["token_ids"]
    np.testing.assert_allclose(got["logprobs"], direct, atol=2e-3)
    np.testing.assert_allclose(got["logprobs"], ref["logprobs"], atol=0.1)


def test_quantized_prefix_hit_and_chunks_equal_the_plain_path(engines):
    """Scoring over pages written by an earlier piece (what a prefix-cache hit and a
    chunked prefill read) gives what one pass gives, with int8 weights."""
    _, q8 = engines
    context, cont = prompt_of(40, seed=5), prompt_of(10, seed=6)
    whole = score_direct(q8, context, cont)
    alloc = PageAllocator(q8.num_pages, seed=1)
    full = context + cont
    table = alloc.take(-(-len(full) // q8.page_size))
    first = q8.score(full[:24], full[1:25], pages=table, start=0)
    rest = q8.score(full[24:-1], full[25:], pages=table, start=24)
    lps = list(first.token_logprobs) + list(rest.token_logprobs)
    np.testing.assert_allclose(lps[len(context) - 1:], whole.token_logprobs, atol=2e-4)


def test_sampled_and_greedy_rows_together(engines):
    _, q8 = engines
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=7)]
    a = drive(q8, [prompt_of(9, seed=1), prompt_of(30, seed=2)], params, max_tokens=5)
    b = drive(q8, [prompt_of(9, seed=1), prompt_of(30, seed=2)], params, max_tokens=5)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]


def test_requantizing_a_quantized_checkpoint_is_refused(engines):
    _, q8 = engines
    with pytest.raises(ValueError, match="already int8"):
        Engine(Transformer(LLAMA_Q, params=nest(quantized_params(LLAMA_Q, "int8"))),
               engine_config(LLAMA_Q, lazy_compile=True, quantize="int4"))


def test_choose_matmul():
    assert qt.choose_matmul("cpu") == "w8a8" and qt.choose_matmul("gpu") == "weight-only"
    assert qt.choose_matmul("gpu", "w8a8") == "w8a8"
    assert qt.choose_matmul("cpu", "w8a8", "int4") == qt.choose_matmul("cpu", quant="int4") == "weight-only"
    with pytest.raises(ValueError, match="int8_matmul"):
        qt.choose_matmul("cpu", "fp8")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, fmt):
    """A checkpoint saved with ``quantize`` restores its quantized arrays exactly, and an
    engine over it serves them without quantizing again."""
    weights = {k: np.asarray(v) for k, v in flatten(params_tree(make_model(LLAMA_Q))).items()}
    path = save_checkpoint(tmp_path / "q", LLAMA_Q, weights, None, progress=False, quantize=fmt)
    assert json.loads((path / "jaxinfer.json").read_text())["quantize"] == fmt
    ck = load_checkpoint(path)
    got = flatten(ck.params)
    want = quantized_params(LLAMA_Q, fmt)
    assert set(got) == set(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(a), err_msg=name)
    assert Transformer(LLAMA_Q, params=ck.params).quant == fmt

