"""Quantized weights: how they are made, held and multiplied.

Formats (declared in :func:`jaxinfer.model.weights.weight_specs`):

- ``int8``: symmetric, one float32 scale per output channel (the absolute
  maximum over the contracted axes / 127).
- ``int4``: asymmetric, a float16 scale and minimum per :data:`INT4_GROUP`
  consecutive inputs (value = q * scale + min, q in 0..15: the affine grid of
  GGUF's Q4_1 and Q4_K blocks, which it reproduces exactly when the groups
  align), held two to a byte along the last contracted axis. It is a storage
  format: it is unpacked and dequantized to the activations' dtype right
  before the matmul. Some tensors stay int8 under it
  (:data:`~jaxinfer.model.weights.INT8_UNDER_INT4`).

Two ways to multiply by an int8 weight (:data:`MATMULS`):

- ``w8a8``: the activations are quantized per token (their own absmax / 127),
  the matmul runs int8 x int8 -> int32, and both scales apply to the int32
  sums. The backend's integer matmul does the work.
- ``weight-only``: the int8 values convert to the activations' dtype inside the
  matmul and the per-channel scale applies to its output (exact: the scale is
  constant along the contracted axes). The bytes read per weight are a quarter
  of float32's, the arithmetic is the float one.

:func:`choose_matmul` is the one rule that picks between them, per backend;
``docs/quantization.md`` has the measurements behind it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfer.model.weights import INT4_GROUP, QUANT_FORMATS, WeightSpec, tensor_format

F32 = jnp.float32
MATMULS = ("w8a8", "weight-only")

# XLA CPU's int8 matmul has no fast path for one to a few rows (matrix-vector):
# padding the rows up to this many is faster than the unpadded integer matmul.
CPU_MIN_INT8_ROWS = 8


def choose_matmul(platform: str, requested: str = "auto", quant: str = "int8") -> str:
    """How the int8 weights of model format ``quant`` multiply on ``platform``
    ("cpu", "gpu", "tpu"): the one place this is decided.

    int4 models compute weight-only throughout (int4 is a storage format, and
    the tensors it keeps int8 are the ones most sensitive to error). int8 on
    a CPU: w8a8 at every batch size (XLA CPU's integer matmul is the faster
    one; rows are padded up to :data:`CPU_MIN_INT8_ROWS`; weight-only there
    converts the whole weight to float32 before every matmul). GPU and TPU:
    weight-only, where decode is bound by the bytes of weights read and the
    dequantize fuses into the float matmul; not measured here (no
    accelerator), so it is the conservative choice. ``requested`` other than
    "auto" overrides the rule for int8 models."""
    if requested not in ("auto",) + MATMULS:
        raise ValueError(f"int8_matmul={requested!r}: expected auto or one of {MATMULS}")
    if quant == "int4":
        return "weight-only"
    if requested != "auto":
        return requested
    return "w8a8" if platform == "cpu" else "weight-only"


def min_rows(platform: str) -> int:
    return CPU_MIN_INT8_ROWS if platform == "cpu" else 1


# --- making quantized weights ----------------------------------------------


def quantize(w: jax.Array, spec: WeightSpec, fmt: str) -> tuple[jax.Array, ...]:
    """The stored arrays of float weight ``w`` (declared by ``spec``) in tensor format
    ``fmt``: (values, scales) for int8, (values, scales, minimums) for int4."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quant={fmt!r}: expected one of {QUANT_FORMATS}")
    w = w.astype(F32)
    if fmt == "int8":
        scale = _best_scale(w, jnp.max(jnp.abs(w), axis=spec.contract, keepdims=True) / 127.0, spec.contract, 127)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    last = spec.contract[-1]
    grouped = _split(w, last, INT4_GROUP)
    # float16 scale and min, as GGUF's blocks hold them; rounded before the values are
    # computed, so that the values are the nearest for the scale that is stored
    lo = jnp.min(grouped, axis=last + 1, keepdims=True).astype(jnp.float16)
    hi = jnp.max(grouped, axis=last + 1, keepdims=True)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(jnp.float16)
    scale = jnp.where(scale == 0, jnp.float16(1.0), scale)
    q = jnp.round((grouped - lo.astype(F32)) / scale.astype(F32))
    q = jnp.clip(q, 0, 15).astype(jnp.uint8)
    return pack_int4(q.reshape(w.shape), last), jnp.squeeze(scale, last + 1), jnp.squeeze(lo, last + 1)


def quantize_weight(name: str, w: jax.Array, spec: WeightSpec, quant: str) -> dict[str, jax.Array]:
    """``{stored name: array}`` of weight ``name`` under model format ``quant``."""
    arrays = quantize(w, spec, tensor_format(name, quant))
    return dict(zip((name, f"{name}_scale", f"{name}_min"), arrays))


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _best_scale(w: jax.Array, absmax_scale: jax.Array, axes, top: int) -> jax.Array:
    """Per channel, the scale among ``absmax_scale * r`` (r in :data:`CLIP_RATIOS`) whose
    rounding error (squared, summed over ``axes``) is least: clipping a few large weights
    buys a finer step for all the others."""
    absmax_scale = jnp.where(absmax_scale == 0, 1.0, absmax_scale)
    best, best_err = absmax_scale, None
    for r in CLIP_RATIOS:
        s = absmax_scale * r
        err = jnp.sum(jnp.square(jnp.clip(jnp.round(w / s), -top, top) * s - w), axis=axes, keepdims=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = jnp.where(better, s, best), jnp.where(better, err, best_err)
    return best


def _split(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Axis ``axis`` of length n -> two axes (n / size, size)."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:])


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """uint8 values in 0..15 -> two a byte along ``axis`` (even index in the low nibble)."""
    pairs = _split(q.astype(jnp.uint8), axis, 2)
    lo, hi = (lax.index_in_dim(pairs, i, axis + 1, keepdims=False) for i in (0, 1))
    return (hi << 4) | lo


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 values in 0..15, ``axis`` doubled."""
    both = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)
    return both.reshape(packed.shape[:axis] + (packed.shape[axis] * 2,) + packed.shape[axis + 1:])


def dequantize(values: jax.Array, scale: jax.Array, contract: tuple[int, ...], fmt: str, dtype=F32,
               minimum: jax.Array | None = None) -> jax.Array:
    """The float weight that the arrays of tensor format ``fmt`` stand for."""
    if fmt == "int8":
        return (values.astype(F32) * scale).astype(dtype)
    last = contract[-1]
    q = unpack_int4(values, last)
    w = (_split(q, last, INT4_GROUP).astype(F32) * jnp.expand_dims(scale.astype(F32), last + 1)
         + jnp.expand_dims(minimum.astype(F32), last + 1))
    return w.reshape(q.shape).astype(dtype)


# --- multiplying by them -----------------------------------------------------


def qdot(x: jax.Array, values: jax.Array, scale: jax.Array, contract: tuple[int, ...], fmt: str, *,
         matmul: str, rows: int = 1, out=None, minimum: jax.Array | None = None) -> jax.Array:
    """``x`` times a quantized weight, contracting x's last ``len(contract)``
    axes with the weight's ``contract`` axes (which come all first or all
    last in the weight). The output is x's leading axes followed by the
    weight's other axes, in ``out`` (default x's dtype). ``rows``: w8a8 pads the rows of x up to
    this many (see :data:`CPU_MIN_INT8_ROWS`)."""
    n = len(contract)
    first = contract[0] == 0
    k = math.prod(x.shape[-n:])
    out_dims = values.shape[n:] if first else values.shape[:-n]
    lead = x.shape[:-n]
    x2 = x.reshape(-1, k)
    if fmt == "int4":  # a storage format, computed in float
        w = dequantize(values, scale, contract, fmt, x.dtype, minimum)
        w2 = w.reshape(k, -1) if first else w.reshape(-1, k)
        y = _dot(x2, w2, first, out or x.dtype)
        return y.reshape(lead + out_dims)
    q2 = values.reshape(k, -1) if first else values.reshape(-1, k)
    s = scale.reshape(-1)
    if matmul == "weight-only":
        y = _dot(x2, q2.astype(x.dtype), first, F32) * s
        return y.astype(out or x.dtype).reshape(lead + out_dims)
    m = x2.shape[0]
    if m < rows:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    xq, xs = quantize_rows(x2)
    acc = _dot(xq, q2, first, jnp.int32)
    y = (acc.astype(F32) * xs * s)[:m]
    return y.astype(out or x.dtype).reshape(lead + out_dims)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> int8 values and float32 scales [M, 1], symmetric per row."""
    x = x.astype(F32)
    scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _dot(x2: jax.Array, w2: jax.Array, first: bool, out) -> jax.Array:
    """[M, K] x ([K, N] if first else [N, K]) -> [M, N] accumulated in ``out``."""
    dims = (((1,), (0,) if first else (1,)), ((), ()))
    return lax.dot_general(x2, w2, dims, preferred_element_type=out)


def gather_rows(values: jax.Array, scale: jax.Array, ids: jax.Array, fmt: str, dtype,
                minimum: jax.Array | None = None) -> jax.Array:
    """Rows ``ids`` of a quantized [V, D] table (the embedding), dequantized: [*ids.shape, D]."""
    rows, scales = jnp.take(values, ids, axis=0), jnp.take(scale, ids, axis=0)
    mins = jnp.take(minimum, ids, axis=0) if minimum is not None else None
    return dequantize(rows, scales, (ids.ndim,), fmt, dtype, mins)
