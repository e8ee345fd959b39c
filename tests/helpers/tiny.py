"""Tiny model and engine configs every engine-level test shares, random models built from them,
and the parts of the tiny BPE checkpoint (a random Llama with a real byte-level BPE tokenizer
trained on the test texts) that ``tests/conftest.py`` saves once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxinfer.config import GEMMA3_270M, SMOLLM2_135M, gemma3_layer_types
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.pages import KVPool
from jaxinfer.model.transformer import Transformer
from jaxinfer.model.weights import nest, random_weights
from jaxinfer.tokenizer import HFTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"

# SmolLM2's head layout (9 heads, 3 kv heads) and Gemma 3's (4 heads, 1 kv head), shrunk.
LLAMA_TINY = dataclasses.replace(
    SMOLLM2_135M, name="llama-tiny", num_layers=2, hidden_size=72, intermediate_size=96,
    vocab_size=512, head_dim=8, max_position_embeddings=512,
)
GEMMA_TINY = dataclasses.replace(
    GEMMA3_270M, name="gemma-tiny", num_layers=6, hidden_size=64, intermediate_size=96,
    vocab_size=512, head_dim=16, query_pre_attn_scalar=16.0, sliding_window=16,
    layer_types=gemma3_layer_types(6), max_position_embeddings=512,
)
PAGE = 8
NUM_PAGES = 96


def engine_config(cfg, num_pages: int = NUM_PAGES, **kw) -> EngineConfig:
    """A small engine for ``cfg``: 4 rows, pages of 8, a pool of ``num_pages`` pages (of the
    ``cache_dtype`` given, else float32), 128 positions."""
    per_token = KVPool.bytes_per_token(cfg, kw.get("cache_dtype") or jnp.float32)
    base = dict(max_seqs=4, max_len=128, page_size=PAGE, prefill_buckets=(16, 32), decode_batches=(2,),
                kv_cache_bytes=num_pages * PAGE * per_token)
    return EngineConfig(**{**base, **kw})


# The tiny BPE checkpoint: LLAMA_TINY's shape with the tokenizer's vocabulary, <bos>=0, <eos>=1.
BPE_TINY = dataclasses.replace(LLAMA_TINY, name="tiny-bpe", vocab_size=384, bos_token_id=0, eos_token_ids=(1,))
BPE_ENGINE = engine_config(BPE_TINY, prefill_buckets=(16, 64), lazy_compile=True)
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def make_model(cfg, seed: int = 0) -> Transformer:
    """A model of ``cfg`` with random weights (scaled so that activations stay in range)."""
    w = random_weights(cfg, seed=seed, scale=0.15)
    return Transformer(cfg, params=nest({k: jnp.asarray(v) for k, v in w.items()}))


def prompt_of(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def bpe_tokenizer(add_bos: bool) -> HFTokenizer:
    """A real byte-level BPE (Hugging Face tokenizers) trained on the test texts: <bos>=0, <eos>=1."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_TINY.vocab_size, special_tokens=["<bos>", "<eos>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([(DATA / "ppl.txt").read_text(), (DATA / "choice.jsonl").read_text()], trainer)
    assert tk.get_vocab_size() <= BPE_TINY.vocab_size
    return HFTokenizer(tk, bos_id=0, eos_ids=[1], add_bos=add_bos, chat_template=CHAT, special_ids=[0, 1])


def bpe_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return random_weights(BPE_TINY, seed=seed, scale=0.15)
