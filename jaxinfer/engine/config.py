"""EngineConfig: the engine's knobs, and how the unset ones are resolved.

Fields (the CLI maps its flags onto these names):

    max_seqs          decode rows: sequences decoded together (--max-seqs)
    max_len           longest sequence, prompt + output (None: the model's context, at most 8192 and the pool)
    page_size         token positions per KV page
    kv_cache_bytes    bytes of the KV pool (--kv-cache-memory); None: the default below
    kv_cache_fraction on a GPU/TPU with kv_cache_bytes unset: this fraction of the device memory left free
                      after the weights
    prefill_buckets   token counts a prefill/score piece pads to; the largest is prefill_chunk
    decode_batches    row counts a decode call pads to (max_seqs is always one)
    prefill_rows      whole short prompts prefilled together by prefill_many (1: off)
    decode_steps      k > 1 also compiles k decode steps per dispatch
    weight_dtype      dtype the weights are held (and computed) in; None: see below
    cache_dtype       dtype of the KV pool (float32, bfloat16, int8); None: the weights'
    quantize          None, "int8" or "int4": weights quantized at load (docs/quantization.md)
    int8_matmul       "auto", "w8a8" or "weight-only": how quantized matmuls compute; auto picks per
                      backend (jaxinfer.model.quant.choose_matmul)
    score_chunk       positions per logits chunk when scoring
    lazy_compile      compile a missing program on first use (scripts); a server compiles ahead of time

Default pool on CPU: ``CPU_KV_CACHE_BYTES`` = 720 MiB, what the previous engine
reserved for SmolLM2 (8 slots x 2048 positions in float32): 16,384 tokens of
SmolLM2 at 46,080 bytes per token; a model with bigger per-token K/V gets
fewer tokens from the same bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CPU_KV_CACHE_BYTES = 720 * 2**20
MAX_LEN_CAP = 8192  # default max_len: the model's context, at most this


@dataclass(frozen=True)
class EngineConfig:
    max_seqs: int = 64
    max_len: int | None = None
    page_size: int = 64  # picked by measurement: docs/engine.md
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.85
    prefill_buckets: tuple[int, ...] = (32, 128, 512)
    decode_batches: tuple[int, ...] = (8,)
    prefill_rows: int = 4
    decode_steps: int = 1
    weight_dtype: str | None = None
    cache_dtype: str | None = None
    quantize: str | None = None
    int8_matmul: str = "auto"
    score_chunk: int = 128
    lazy_compile: bool = False

    def check(self) -> None:
        """Raise ValueError naming a field out of its range."""
        checks = [
            ("max_seqs", self.max_seqs >= 1, ">= 1"),
            ("page_size", self.page_size >= 1, ">= 1"),
            ("kv_cache_bytes", self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "> 0"),
            ("kv_cache_fraction", 0.0 < self.kv_cache_fraction <= 1.0, "in (0, 1]"),
            ("prefill_buckets", bool(self.prefill_buckets) and min(self.prefill_buckets) >= 1, "non-empty, >= 1"),
            ("decode_batches", all(b >= 1 for b in self.decode_batches), ">= 1 each"),
            ("prefill_rows", self.prefill_rows >= 1, ">= 1"),
            ("decode_steps", self.decode_steps >= 1, ">= 1"),
            ("score_chunk", self.score_chunk >= 1, ">= 1"),
            ("max_len", self.max_len is None or self.max_len >= 2, ">= 2"),
            ("cache_dtype", self.cache_dtype in (None, "float32", "bfloat16", "int8"),
             "one of float32, bfloat16, int8"),
            ("quantize", self.quantize in (None, "int8", "int4"), "one of int8, int4"),
            ("int8_matmul", self.int8_matmul in ("auto", "w8a8", "weight-only"), "one of auto, w8a8, weight-only"),
        ]
        for name, ok, limit in checks:
            if not ok:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r} must be {limit}")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected e.g. 2GiB, 512MiB, 1GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
