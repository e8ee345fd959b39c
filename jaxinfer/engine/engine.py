"""The compiled engine: jitted prefill and decode over a preallocated KV cache.

* The KV cache and the per-slot decode state (last token, length, sampling
  parameters, token counts for penalties) live on the device in one
  :class:`DecodeState`, allocated once and donated to every call, so no second
  copy of the cache ever exists.
* ``prefill`` writes one padded prompt (or a chunk of one, at an offset) into a
  slot and samples its first token. ``decode`` runs one step for every slot and
  feeds the sampled tokens back on the device, so steps can be dispatched
  before the host has read the previous step's tokens.
* Prompt lengths pad to a few buckets and attention reads only a bucketed span
  of the cache (a decode step at length 100 does not pay for ``max_len``). Every
  (bucket, span) variant is compiled ahead of time by :meth:`Engine.compile`;
  serving calls the compiled executables only, so nothing compiles while serving.
* Weights and state are placed on a ``("data", "model")`` mesh by the logical
  axis rules in :mod:`jaxinfer.sharding`.
* Weights and cache are kept one buffer per layer (and the cache one buffer
  per position block, with block edges at the attended spans), and the layers
  run unrolled. XLA CPU copies any slice it takes of a buffer: under a scan
  over stacked weights, every decode step copied every weight, and reading a
  span of a longer cache copied the span. q/k/v and gate/up are fused into one
  matmul each where the sharding allows, every projection is stored [out, in]
  and the residual stream runs features-first (``transformer.linear_t``); key
  blocks are transposed, [slots, kv_heads, head_dim, block].
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import sharding as shd
from jaxinfer.config import ModelConfig
from jaxinfer.engine.sampling import Sampled, SlotSampling, logsumexp_from_max, max_argmax, sample
from jaxinfer.engine.types import EngineStats, SamplingParams, ScoreOutput, SlotToken
from jaxinfer.model.transformer import KVCache, Transformer, split_layers
from jaxinfer.model.weights import weight_specs

log = logging.getLogger(__name__)
F32 = jnp.float32
# Largest [rows, positions, vocab] logits chunk one packed score call may hold (256 MiB in float32).
_SCORE_LOGITS_ELEMS = 1 << 26


@dataclass(frozen=True)
class EngineConfig:
    slots: int = 8
    max_len: int = 2048
    # Prompt pieces pad to the smallest bucket that holds them; the largest bucket
    # is the chunk size for longer prompts.
    prefill_buckets: tuple[int, ...] = (32, 128, 512)
    min_span: int = 128  # smallest attended span (power-of-two spans up to max_len)
    # Spans per doubling: 1 gives min_span, 2x, 4x, ... max_len; 2 adds the
    # points half way (128, 192, 256, 384, ...), so a step reads at most 1.5x
    # the positions it needs instead of 2x, for about twice the decode and
    # prefill programs to compile.
    span_steps: int = 1
    # Each layer's KV cache is a list of position blocks. True: blocks end at
    # the attended spans (128, 128, 256, ...), so any span is read as whole
    # buffers (on CPU, XLA copies any slice of a buffer); False: one block of
    # max_len. None: True on CPU, False elsewhere.
    span_blocks: bool | None = None
    # Longest block. Measured at batch 32, context 1000 (SmolLM2, 2 cores):
    # blocks of 128 attend in 112 ms/step, 256 in 131, 512 in 152; more blocks
    # compile slower (each is its own matmuls: 13.6 s vs 8.3 s vs 6.2 s for a
    # span-2048 decode program).
    kv_block_max: int = 128
    cache_dtype: str | None = None  # default: the weights' dtype (as held, below)
    # dtype the engine holds the weights in, and so computes in. None keeps the
    # checkpoint's, except bfloat16 weights on a CPU backend, which are held in
    # float32: XLA CPU has no bfloat16 matmul kernel, so it would convert every
    # weight (and, with a bfloat16 cache, every cache block it writes or reads)
    # to float32 on every call, and decode ~10x slower (SmolLM2, 2 cores: 146 ms
    # per batch-1 step against 14). The values are the same (float32 holds every
    # bfloat16 exactly); the memory for weights doubles. "bfloat16" or
    # "float32" forces one.
    weight_dtype: str | None = None
    # Bytes for the KV cache; when set, ``slots`` is derived from it.
    memory_budget_bytes: int | None = None
    # Decode compiles for these prefixes of the slots (and all slots), so a
    # lightly loaded server does not pay for every slot.
    decode_rows: tuple[int, ...] = (1, 4, 16)
    # Whole prompts shorter than the largest bucket can be prefilled this many
    # at a time (``prefill_many``); their programs compile for every bucket but
    # the largest, with this many rows (fewer prompts pad with rows that write
    # nothing). 1: one prompt per call. On 2 CPU cores, 4 prompts of 32 tokens
    # in one call take 1.6x less time per prompt than 4 calls.
    prefill_rows: int = 4
    # Also compile decode programs that run this many steps per dispatch (a
    # device loop over the one-step body; 1: none). Drivers call
    # ``decode(active, steps=k)`` and drop tokens past a stop.
    decode_steps: int = 1
    score_chunk: int = 128  # positions per logits chunk when scoring
    seed: int = 0  # seed for requests that give none
    # Compile a variant on first use instead of failing (scripts and the CLI;
    # a server compiles everything ahead of time and keeps this off).
    lazy_compile: bool = False

    def resolved(self, cfg: ModelConfig, cache_dtype) -> "EngineConfig":
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_len={self.max_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}"
            )
        slots = self.slots
        if self.memory_budget_bytes:
            per_slot = KVCache.bytes_per_token(cfg, cache_dtype) * self.max_len
            slots = int(self.memory_budget_bytes // per_slot)
            if slots < 1:
                raise ValueError(
                    f"memory budget {self.memory_budget_bytes} B holds no slot of max_len={self.max_len} "
                    f"({per_slot} B per slot)"
                )
        buckets = tuple(sorted({min(b, self.max_len) for b in self.prefill_buckets}))
        if self.prefill_rows < 1 or self.decode_steps < 1 or self.span_steps < 1:
            raise ValueError(f"prefill_rows={self.prefill_rows}, decode_steps={self.decode_steps} and "
                             f"span_steps={self.span_steps} must be >= 1")
        return dataclasses.replace(self, slots=slots, prefill_buckets=buckets)


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """Everything the device keeps per slot between calls (donated each call)."""

    cache: KVCache
    tokens: jax.Array  # i32 [slots]: next decode input (last sampled token)
    lengths: jax.Array  # i32 [slots]: tokens in the cache = position of the next token
    sampling: SlotSampling  # [slots] each
    counts: jax.Array  # i32 [slots, vocab]: generated-token counts (penalties)
    seen: jax.Array  # bool [slots, vocab]: tokens in prompt or output (repetition penalty)


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Persistent XLA compilation cache, so a second start does not recompile."""
    d = Path(directory or os.environ.get("JAXINFER_XLA_CACHE", Path.home() / ".cache" / "jaxinfer" / "xla"))
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return d


def _spans(min_span: int, max_len: int, per_doubling: int = 1) -> tuple[int, ...]:
    """Attended spans: min_span doubling up to max_len, with per_doubling - 1
    evenly spaced points inside each doubling."""
    spans, s = set(), min(min_span, max_len)
    while s < max_len:
        spans.update(s + i * s // per_doubling for i in range(per_doubling))
        s *= 2
    return tuple(sorted(x for x in spans if x < max_len)) + (max_len,)


def _round_up(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


class _Step:
    """Handle of a dispatched decode call; ``result()`` (one step) and
    ``results()`` (every step of a multi-step call) block."""

    def __init__(self, out: Sampled, active: Sequence[int], want_top: dict[int, int], steps: int = 0):
        # steps: 0 for a one-step call (outputs [rows]), else k (outputs [k, rows])
        self._out, self._active, self._want_top, self._steps = out, list(active), want_top, steps

    def result(self) -> dict[int, SlotToken]:
        if self._steps:
            raise ValueError(f"a {self._steps}-step decode call: use results()")
        return self.results()[0]

    def results(self) -> list[dict[int, SlotToken]]:
        """Per step, slot -> token."""
        lead = (lambda a: a) if self._steps else (lambda a: a[None])  # noqa: E731
        token = lead(np.asarray(self._out.token))
        lp = lead(np.asarray(self._out.logprob))
        need_top = any(self._want_top.get(s, 0) for s in self._active)
        top_ids = lead(np.asarray(self._out.top_ids)) if need_top else None
        top_lp = lead(np.asarray(self._out.top_logprobs)) if need_top else None
        out = []
        for i in range(token.shape[0]):
            res = {}
            for s in self._active:
                n = self._want_top.get(s, 0)
                res[s] = SlotToken(
                    int(token[i, s]),
                    float(lp[i, s]),
                    tuple(int(j) for j in top_ids[i, s, :n]) if n else (),
                    tuple(float(v) for v in top_lp[i, s, :n]) if n else (),
                )
            out.append(res)
        return out


class Engine:
    """Prefill/decode/score over one model on one mesh. Not thread-safe: one
    driver (the scheduler thread, or a script) calls it."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig = EngineConfig(),
        *,
        mesh: Mesh | None = None,
        tokenizer=None,
        name: str = "",
    ):
        self.cfg: ModelConfig = model.cfg
        self.mesh = mesh or shd.make_mesh()
        self.tokenizer = tokenizer
        self.name = name or self.cfg.name
        self.graphdef, params = nnx.split(model)
        self.checkpoint_dtype = jax.tree.leaves(params)[0].dtype
        self.dtype = self._weight_dtype(config, self.checkpoint_dtype, self.mesh)
        if self.dtype != self.checkpoint_dtype:
            log.info("holding %s weights as %s on %s (EngineConfig.weight_dtype)", self.checkpoint_dtype,
                     self.dtype, self.mesh.devices.flat[0].platform)
            params = jax.tree.map(lambda a: a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                  params)
        cache_dtype = jnp.dtype(config.cache_dtype or self.dtype)
        self.config = config.resolved(self.cfg, cache_dtype)
        self.num_slots = self.config.slots
        self.max_len = self.config.max_len
        self.prefill_chunk = self.config.prefill_buckets[-1]
        self.prefill_rows = self.config.prefill_rows
        self.spans = _spans(self.config.min_span, self.max_len, self.config.span_steps)
        span_blocks = self.config.span_blocks
        if span_blocks is None:
            span_blocks = self.mesh.devices.flat[0].platform == "cpu"
        # The cache rows allocated. A one-slot engine gets a second, never used
        # row: a step that reads every row of a one-row cache makes XLA CPU copy
        # each cache block several times (SmolLM2 at span 512: 38 ms per step on
        # the block layout and 40 ms on one block, against 16-17 ms when the one
        # slot is a prefix of two). Not measured on a GPU; padded there too.
        self.cache_rows = 2 if self.num_slots == 1 else self.num_slots
        if span_blocks:  # blocks end at every span, and hold at most kv_block_max positions
            edges = sorted({e for a, b in zip((0, *self.spans), self.spans)
                            for e in range(a + self.config.kv_block_max, b, self.config.kv_block_max)} | set(self.spans))
            self.kv_blocks = KVCache.blocks_at(edges)
        else:
            self.kv_blocks = (self.max_len,)
        # Decode runs over the first `rows` slots; drivers fill low slots first.
        # Slots sharded over `data` always decode whole.
        if self.mesh.shape["data"] > 1:
            self.decode_rows = (self.num_slots,)
        else:
            self.decode_rows = tuple(sorted({min(r, self.num_slots) for r in self.config.decode_rows} | {self.num_slots}))
        self.params = self._place_params(params)
        self.state = self._init_state(cache_dtype)
        self._host_len = np.zeros(self.num_slots, np.int64)
        self._sampled = np.zeros(self.num_slots, np.bool_)  # slot samples (temperature > 0)
        self._want_top: dict[int, int] = {}
        self._compiled: dict[tuple, object] = {}
        self._score_jit = {}
        self.compile_seconds: dict[str, float] = {}
        self._build_jits()

    # --- construction ------------------------------------------------------

    @staticmethod
    def _weight_dtype(config: EngineConfig, checkpoint_dtype, mesh: Mesh):
        """The dtype the engine holds the weights in (see EngineConfig.weight_dtype)."""
        if config.weight_dtype is not None:
            return jnp.dtype(config.weight_dtype)
        if checkpoint_dtype == jnp.bfloat16 and mesh.devices.flat[0].platform == "cpu":
            return jnp.dtype(jnp.float32)
        return jnp.dtype(checkpoint_dtype)

    def _place_params(self, params):
        """Place every weight by the sharding rules. Layer weights become one
        buffer per layer (the unrolled forward reads them without slicing); the
        stacked arrays are dropped from the module state, which keeps empty
        placeholders. Returns ``(state, per-layer weight dicts)``."""
        specs = weight_specs(self.cfg)
        shardings = shd.weight_shardings(self.cfg, self.mesh)
        flat = dict(nnx.to_flat_state(params))
        placed, stacked, layer_sh = {}, {}, {}
        for path, var in flat.items():
            name = "/".join(str(p) for p in path)
            if path[0] == "layers":
                leaf = str(path[-1])
                spec = specs[name]
                layer_sh[leaf] = shd.named_sharding(spec.axes[1:], spec.shape[1:], self.mesh, what=name)
                stacked[leaf] = var[...]
                placed[path] = jnp.zeros((0,), var[...].dtype)
            else:
                placed[path] = jax.device_put(var[...], shardings[name])
        layers = [self._fuse_projections(lp, layer_sh) for lp in split_layers(stacked, layer_sh)]
        del stacked
        for path, var in flat.items():
            var.set_value(placed[path]) if hasattr(var, "set_value") else setattr(var, "value", placed[path])
        return params, layers

    # checkpoint weight -> (engine name, axis order): output features first,
    # the contracted (input) axis last; see transformer.linear_t.
    _TRANSPOSED = {
        "wq": ("wq_t", (1, 2, 0)),  # [D, H, Hd] -> [H, Hd, D]
        "wk": ("wk_t", (1, 2, 0)),
        "wv": ("wv_t", (1, 2, 0)),
        "wo": ("wo_t", (2, 0, 1)),  # [H, Hd, D] -> [D, H, Hd]
        "w_gate": ("w_gate_t", (1, 0)),  # [D, F] -> [F, D]
        "w_up": ("w_up_t", (1, 0)),
        "w_down": ("w_down_t", (1, 0)),  # [F, D] -> [D, F]
    }

    def _fuse_projections(self, lp: dict, sh: dict) -> dict:
        """The engine's layout of one layer's weights: every projection
        transposed to [out, in] (each keeps its sharding, axes permuted), and
        fewer, larger matmuls (each op costs a few microseconds of dispatch on
        the CPU runtime): gate and up as one ``[F, 2, D]`` weight, and q, k, v
        as one ``[heads + 2 kv_heads, Hd, D]`` weight when no mesh axis splits
        the heads (a split would not follow the q/k/v boundaries)."""
        def spec_of(name):
            spec = tuple(sh[name].spec)
            return spec + (None,) * (lp[name].ndim - len(spec))

        out = dict(lp)
        specs = {}
        for name, (new, perm) in self._TRANSPOSED.items():
            spec = spec_of(name)
            specs[new] = tuple(spec[i] for i in perm)
            out[new] = jax.jit(lambda a, perm=perm: a.transpose(perm),
                               out_shardings=NamedSharding(self.mesh, PartitionSpec(*specs[new])))(out.pop(name))
        f_axis, d_axis = specs["w_gate_t"]
        gu_sh = NamedSharding(self.mesh, PartitionSpec(f_axis, None, d_axis))
        out["w_gate_up_t"] = jax.jit(lambda g, u: jnp.stack([g, u], axis=1), out_shardings=gu_sh)(
            out.pop("w_gate_t"), out.pop("w_up_t"))
        if all(specs[n][0] is None for n in ("wq_t", "wk_t", "wv_t")):
            qkv_sh = NamedSharding(self.mesh, PartitionSpec(*specs["wq_t"]))
            out["wqkv_t"] = jax.jit(lambda q, k, v: jnp.concatenate([q, k, v]), out_shardings=qkv_sh)(
                out.pop("wq_t"), out.pop("wk_t"), out.pop("wv_t"))
        return out

    def reference_model(self) -> Transformer:
        """A plain (stacked, scanned) ``Transformer`` over this engine's own
        weights, for checks against the compiled paths."""
        state, layers = self.params
        model = nnx.merge(self.graphdef, jax.tree.map(lambda a: a, state))
        H = self.cfg.num_heads
        G = self.cfg.num_kv_heads

        def unfuse(lp: dict) -> dict:
            lp = dict(lp)
            gu = lp.pop("w_gate_up_t")
            lp["w_gate_t"], lp["w_up_t"] = gu[:, 0], gu[:, 1]
            if "wqkv_t" in lp:
                qkv = lp.pop("wqkv_t")
                lp["wq_t"], lp["wk_t"], lp["wv_t"] = qkv[:H], qkv[H : H + G], qkv[H + G :]
            for name, (new, perm) in self._TRANSPOSED.items():
                lp[name] = lp.pop(new).transpose(np.argsort(perm))
            return lp

        plain = [unfuse(lp) for lp in layers]
        for leaf in plain[0]:
            getattr(model.layers, leaf).set_value(jnp.stack([lp[leaf] for lp in plain]))
        return model

    def _state_shardings(self) -> DecodeState:
        m = self.mesh
        S, V = self.cache_rows, self.cfg.vocab_size
        L = self.cfg.num_layers

        def block_sharding(axes, shape):
            return shd.named_sharding(axes, shape, m, what="kv cache")

        self._kv_block_sharding = block_sharding

        def blocks(keys):
            return [block_sharding(KVCache.block_axes(keys), KVCache.block_shape(self.cfg, S, n, keys))
                    for n in self.kv_blocks]

        slot = shd.named_sharding(("slots",), (S,), m, what="slots")
        slot2 = shd.named_sharding(("slots", None), (S, 2), m, what="seeds")
        sv = shd.named_sharding(("slots", "vocab"), (S, V), m, what="token counts")
        samp = SlotSampling(*([slot] * 7), seed=slot2)
        return DecodeState(KVCache([blocks(True) for _ in range(L)], [blocks(False) for _ in range(L)]),
                           slot, slot, samp, sv, sv)

    def _blocks_read(self, span: int) -> int:
        """How many cache blocks hold positions [0, span)."""
        starts = np.cumsum([0, *self.kv_blocks])[:-1]
        return int((starts < span).sum())

    def _head(self, ds: DecodeState, span: int) -> DecodeState:
        """The state with only the cache blocks a call of this span reads and
        writes. Calls get (and donate) just these: the runtime's per-call work
        grows with the number of buffers passed (about 3 us each on CPU, both
        ways), and the blocks past the span are not touched anyway."""
        n = self._blocks_read(span)
        if n == len(self.kv_blocks):
            return ds
        c = ds.cache
        return dataclasses.replace(ds, cache=KVCache([b[:n] for b in c.k], [b[:n] for b in c.v]))

    def _call(self, key: tuple, span: int, *args) -> Sampled:
        """Run a prefill/decode executable on the blocks of ``span``, and put
        the returned blocks back in front of the ones it did not get."""
        n = self._blocks_read(span)
        old = self.state.cache
        head, out = self._exe(key)(self.params, self._head(self.state, span), *args)
        if n < len(self.kv_blocks):
            c = head.cache
            head = dataclasses.replace(head, cache=KVCache([a + b[n:] for a, b in zip(c.k, old.k)],
                                                           [a + b[n:] for a, b in zip(c.v, old.v)]))
        self.state = head
        return out

    def _init_state(self, cache_dtype) -> DecodeState:
        S, V = self.cache_rows, self.cfg.vocab_size
        self._shardings = sh = self._state_shardings()
        cache = KVCache.zeros(self.cfg, S, self.max_len, cache_dtype, self._kv_block_sharding, blocks=self.kv_blocks)

        def build():
            return DecodeState(
                cache=None,
                tokens=jnp.zeros((S,), jnp.int32),
                lengths=jnp.zeros((S,), jnp.int32),
                sampling=SlotSampling.zeros(S),
                counts=jnp.zeros((S, V), jnp.int32),
                seen=jnp.zeros((S, V), jnp.bool_),
            )

        rest = jax.jit(build, out_shardings=dataclasses.replace(sh, cache=None))()
        return dataclasses.replace(rest, cache=cache)

    # --- the compiled functions ---------------------------------------------

    def _build_jits(self) -> None:
        graphdef, cfg, ecfg = self.graphdef, self.cfg, self.config
        max_len = self.max_len
        rep = NamedSharding(self.mesh, PartitionSpec())
        sh = self._shardings

        def prefill(params, ds: DecodeState, tokens, slots, start, n, rows: SlotSampling, last, *, span):
            model, layers = nnx.merge(graphdef, params[0]), params[1]
            P, T = tokens.shape
            idx = jnp.arange(T, dtype=jnp.int32)[None, :]
            valid = idx < n[:, None]
            positions = jnp.where(valid, start[:, None] + idx, max_len)
            hidden, cache = model(tokens, positions, ds.cache, slots, span, layer_params=layers)
            last_h = jnp.take_along_axis(hidden, (n - 1)[:, None, None], axis=1)[:, 0]
            logits = model.logits(last_h)
            fresh = (start == 0)[:, None]
            seen = jnp.where(fresh, False, ds.seen[slots])
            seen = seen.at[jnp.arange(P)[:, None], jnp.where(valid, tokens, cfg.vocab_size)].set(True, mode="drop")
            counts = jnp.where(fresh, 0, ds.counts[slots])
            out = sample(logits, rows, counts, seen, start + n)
            counts = counts.at[jnp.arange(P), out.token].add(last.astype(jnp.int32))
            seen = seen.at[jnp.arange(P), out.token].set(seen[jnp.arange(P), out.token] | last)
            # slots out of range are prefill_many's padding rows: their writes are dropped
            samp = jax.tree.map(lambda a, r: a.at[slots].set(r, mode="drop"), ds.sampling, rows)
            ds = DecodeState(
                cache=cache,
                tokens=ds.tokens.at[slots].set(out.token, mode="drop"),
                lengths=ds.lengths.at[slots].set(start + n, mode="drop"),
                sampling=samp,
                counts=ds.counts.at[slots].set(counts, mode="drop"),
                seen=ds.seen.at[slots].set(seen, mode="drop"),
            )
            return ds, out

        def decode(params, ds: DecodeState, active, want_top, *, span, rows, greedy_only):
            """One step for slots [0, rows); active: bool [rows]; want_top: bool, any
            active slot asked for top logprobs."""
            model, layers = nnx.merge(graphdef, params[0]), params[1]
            head = lambda a: a[:rows]  # noqa: E731
            lengths = head(ds.lengths)
            positions = jnp.where(active, lengths, max_len)[:, None]
            hidden, cache = model(head(ds.tokens)[:, None], positions, ds.cache, None, span, layer_params=layers)
            logits = model.logits(hidden[:, 0])
            counts, seen = head(ds.counts), head(ds.seen)
            out = sample(logits, jax.tree.map(head, ds.sampling), counts, seen, lengths + 1, greedy_only=greedy_only,
                         want_top=want_top)
            r = jnp.arange(rows)
            inc = active.astype(jnp.int32)
            ds = DecodeState(
                cache=cache,
                tokens=ds.tokens.at[:rows].set(jnp.where(active, out.token, head(ds.tokens))),
                lengths=ds.lengths.at[:rows].add(inc),
                sampling=ds.sampling,
                counts=ds.counts.at[r, out.token].add(inc),
                seen=ds.seen.at[r, out.token].set(seen[r, out.token] | active),
            )
            return ds, out

        def out_sh(span):  # the state a call gets and returns holds only the blocks its span reads
            return (self._head(sh, span), Sampled(rep, rep, rep, rep))

        def decode_k(params, ds: DecodeState, active, want_top, *, span, rows, greedy_only, steps):
            """``steps`` decode steps in one program: a device loop over the
            one-step body, each step's sampled token feeding the next. Returns
            every step's output, stacked on a leading [steps] axis."""
            one = functools.partial(decode, span=span, rows=rows, greedy_only=greedy_only)
            shapes = jax.eval_shape(one, params, ds, active, want_top)[1]
            outs = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), shapes)

            def body(i, carry):
                ds, outs = carry
                ds, out = one(params, ds, active, want_top)
                return ds, jax.tree.map(lambda buf, o: buf.at[i].set(o), outs, out)

            return jax.lax.fori_loop(0, steps, body, (ds, outs))

        self._prefill_jit = {
            span: jax.jit(
                lambda p, ds, *a, span=span: prefill(p, ds, *a, span=span), donate_argnums=1,
                out_shardings=out_sh(span)
            )
            for span in self.spans
        }
        self._decode_jit = {
            (rows, span, greedy): jax.jit(
                lambda p, ds, a, w, span=span, rows=rows, g=greedy: decode(p, ds, a, w, span=span, rows=rows,
                                                                          greedy_only=g),
                donate_argnums=1,
                out_shardings=out_sh(span),
            )
            for rows in self.decode_rows
            for span in self.spans
            for greedy in (True, False)
        }
        k = ecfg.decode_steps
        self._decode_k_jit = {
            (rows, span, greedy): jax.jit(
                lambda p, ds, a, w, span=span, rows=rows, g=greedy: decode_k(p, ds, a, w, span=span, rows=rows,
                                                                            greedy_only=g, steps=k),
                donate_argnums=1,
                out_shardings=out_sh(span),
            )
            for rows in self.decode_rows
            for span in self.spans
            for greedy in (True, False)
        } if k > 1 else {}

        def score(params, tokens, targets):
            model, layers = nnx.merge(graphdef, params[0]), params[1]
            P, T = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
            hidden, _ = model(tokens, positions, None, None, 0, layer_params=layers)  # padding sits after each row: harmless
            C = min(ecfg.score_chunk, T)
            hc = hidden.reshape(P, T // C, C, -1).swapaxes(0, 1)
            tc = targets.reshape(P, T // C, C).swapaxes(0, 1)

            def chunk(args):
                h, t = args
                logits = model.logits(h)  # [P, C, V] for this chunk only
                m, greedy = max_argmax(logits)
                lse = logsumexp_from_max(logits, m)
                tl = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
                return tl - lse, greedy, m - lse  # the target's, the argmax and the argmax's log-prob

            out = jax.lax.map(chunk, (hc, tc))
            return tuple(x.swapaxes(0, 1).reshape(P, T) for x in out)

        self._score_fn = jax.jit(score)

    def _args_prefill(self, P: int, T: int):
        return (
            np.zeros((P, T), np.int32),
            np.zeros((P,), np.int32),
            np.zeros((P,), np.int32),
            np.ones((P,), np.int32),
            SlotSampling(**{k: np.stack([v] * P) for k, v in SlotSampling.host_row(SamplingParams(), 0).items()}),
            np.zeros((P,), np.bool_),
        )

    @property
    def decode_steps(self) -> int:
        """Steps ``decode(active, steps)`` runs per call besides one (1: one only)."""
        return self.config.decode_steps

    @property
    def prefill_many_limit(self) -> int:
        """Longest prompt ``prefill_many`` takes (0: it takes none): the
        largest bucket below the chunk size, when prefill_rows > 1."""
        small = [b for b in self.config.prefill_buckets if b < self.prefill_chunk]
        return small[-1] if small and self.config.prefill_rows > 1 else 0

    def _prefill_span(self, start: int, n: int, T: int) -> int:
        """Attended span of a prefill piece: the new keys are written first and
        read back, so it covers positions [0, start + n). A fresh prompt uses its
        bucket's span (one variant per bucket); a continuation chunk at least
        ``prefill_chunk + 1``."""
        if start == 0:
            return _round_up(T, self.spans)
        return _round_up(min(max(start + n, self.prefill_chunk + 1), self.max_len), self.spans)

    def prefill_variants(self) -> list[tuple[int, int]]:
        """(bucket, span) pairs. Fresh prompts pad to a bucket; continuation
        chunks are a full chunk reading the cached span before and including them."""
        variants = {(b, _round_up(b, self.spans)) for b in self.config.prefill_buckets}
        variants |= {(self.prefill_chunk, s) for s in self.spans if s > self.prefill_chunk}
        if self.prefill_chunk < self.max_len:
            variants.add((self.prefill_chunk, self.max_len))
        return sorted(variants)

    def variants(self) -> list[tuple[str, int, int]]:
        """Every executable serving can need: ("prefill", bucket, span, False) and
        ("decode", rows, span, greedy_only)."""
        todo = [("prefill", t, s, False) for t, s in self.prefill_variants()]
        todo += [("prefill_rows", b, _round_up(b, self.spans), False) for b in self.config.prefill_buckets
                 if b <= self.prefill_many_limit]
        kinds = ("decode", "decode_k") if self.config.decode_steps > 1 else ("decode",)
        return todo + [(kind, r, s, g) for kind in kinds for r in self.decode_rows for s in self.spans
                       for g in (True, False)]

    def _compile_variant(self, key: tuple[str, int, int, bool]):
        kind, n, span, greedy = key
        t0 = time.perf_counter()
        if kind in ("prefill", "prefill_rows"):
            rows = self.config.prefill_rows if kind == "prefill_rows" else 1
            exe = self._prefill_jit[span].lower(self.params, self._head(self.state, span),
                                                *self._args_prefill(rows, n)).compile()
        else:
            mask = np.zeros(n, np.bool_)
            jits = self._decode_jit if kind == "decode" else self._decode_k_jit
            exe = jits[(n, span, greedy)].lower(self.params, self._head(self.state, span), mask,
                                                np.bool_(False)).compile()
        self._compiled[key] = exe
        steps = f" steps={self.config.decode_steps}" if kind == "decode_k" else ""
        what = f"T={n}" if kind == "prefill" else f"rows={self.config.prefill_rows} T={n}" if kind == "prefill_rows" \
            else f"rows={n}"
        label = f"{kind} {what} span={span}{steps}" + (" greedy" if greedy else "")
        self.compile_seconds[label] = time.perf_counter() - t0
        return exe, label

    def compile(self, progress: bool = True) -> dict[str, float]:
        """Compile every prefill variant and every decode variant ahead of time."""
        todo = [k for k in self.variants() if k not in self._compiled]
        t_all = time.perf_counter()
        # XLA compiles with the GIL released and mostly on one thread: compile
        # as many programs at once as there are cores.
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for i, (_, label) in enumerate(pool.map(self._compile_variant, todo), 1):
                if progress:
                    log.info("compiled %d/%d %s in %.1fs", i, len(todo), label, self.compile_seconds[label])
        self.compile_seconds["total"] = time.perf_counter() - t_all
        return self.compile_seconds

    def _exe(self, key: tuple):
        exe = self._compiled.get(key)
        if exe is None:
            if not self.config.lazy_compile:
                raise RuntimeError(f"engine variant {key} was not compiled; call Engine.compile() before serving")
            exe, label = self._compile_variant(key)
            log.debug("compiled %s on first use in %.1fs", label, self.compile_seconds[label])
        return exe

    # --- the protocol the scheduler uses ----------------------------------

    def prefill(
        self, slot: int, tokens: Sequence[int], params: SamplingParams, *, start: int = 0, last: bool = True
    ) -> SlotToken | None:
        n = len(tokens)
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        if n == 0:
            raise ValueError("empty prompt")
        if start + n >= self.max_len:
            raise ValueError(f"prompt of {start + n} tokens does not fit max_len={self.max_len} (needs one more for output)")
        if start == 0 and n > self.prefill_chunk:
            out = None
            for off in range(0, n, self.prefill_chunk):
                piece = tokens[off : off + self.prefill_chunk]
                out = self.prefill(slot, piece, params, start=off, last=last and off + len(piece) == n)
            return out
        if n > self.prefill_chunk:
            raise ValueError(f"prefill chunk of {n} tokens exceeds prefill_chunk={self.prefill_chunk}")
        T = _round_up(n, self.config.prefill_buckets) if start == 0 else self.prefill_chunk
        span = self._prefill_span(start, n, T)
        padded = np.zeros((1, T), np.int32)
        padded[0, :n] = tokens
        row = SlotSampling.host_row(params, self.config.seed + slot)
        rows = SlotSampling(**{k: v[None] for k, v in row.items()})
        args = (padded, np.array([slot], np.int32), np.array([start], np.int32), np.array([n], np.int32), rows,
                np.array([last]))
        out = self._call(("prefill", T, span, False), span, *args)
        self._host_len[slot] = start + n
        self._want_top[slot] = params.logprobs
        self._sampled[slot] = params.temperature > 0
        if not last:
            return None
        return _Step(out, [0], {0: params.logprobs}).result()[0]

    def prefill_many(self, items: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> list[SlotToken]:
        """Prefill several whole prompts, (slot, tokens, params) each, into
        their slots in one call and sample each one's first token. Every prompt
        must fit ``prefill_many_limit``; at most ``prefill_rows`` of them."""
        items = list(items)
        if len(items) == 1:
            slot, tokens, params = items[0]
            return [self.prefill(slot, tokens, params)]
        P, limit = self.config.prefill_rows, self.prefill_many_limit
        if not 1 <= len(items) <= P:
            raise ValueError(f"prefill_many takes 1 to prefill_rows={P} prompts, got {len(items)}")
        slots = [slot for slot, _, _ in items]
        if len(set(slots)) != len(slots) or not all(0 <= s < self.num_slots for s in slots):
            raise ValueError(f"slots {slots} must be distinct and in [0, {self.num_slots})")
        longest = max(len(t) for _, t, _ in items)
        if min(len(t) for _, t, _ in items) == 0:
            raise ValueError("empty prompt")
        if longest > limit:
            raise ValueError(f"prefill_many takes prompts of at most {limit} tokens, got {longest}")
        T = _round_up(longest, self.config.prefill_buckets)
        span = _round_up(T, self.spans)
        # Padding rows: row cache_rows (out of range, so every write of theirs is
        # dropped) and one token.
        padded = np.zeros((P, T), np.int32)
        slot_arr = np.full(P, self.cache_rows, np.int32)
        n_arr = np.ones(P, np.int32)
        rows = [SlotSampling.host_row(SamplingParams(), 0)] * P
        for i, (slot, tokens, params) in enumerate(items):
            padded[i, : len(tokens)] = tokens
            slot_arr[i], n_arr[i] = slot, len(tokens)
            rows[i] = SlotSampling.host_row(params, self.config.seed + slot)
        samp = SlotSampling(**{k: np.stack([r[k] for r in rows]) for k in rows[0]})
        args = (padded, slot_arr, np.zeros(P, np.int32), n_arr, samp, np.ones(P, np.bool_))
        out = self._call(("prefill_rows", T, span, False), span, *args)
        for slot, tokens, params in items:
            self._host_len[slot] = len(tokens)
            self._want_top[slot] = params.logprobs
            self._sampled[slot] = params.temperature > 0
        res = _Step(out, range(len(items)), {i: p.logprobs for i, (_, _, p) in enumerate(items)}).result()
        return [res[i] for i in range(len(items))]

    def decode(self, active: Sequence[int], steps: int = 1) -> _Step:
        """Dispatch one decode step for the active slots (or ``steps`` of them in
        one program, when the engine was built with ``decode_steps=steps``).
        Returns at once; the handle's ``result()`` / ``results()`` block."""
        active = list(active)
        if steps not in (1, self.config.decode_steps):
            raise ValueError(f"steps={steps}: this engine decodes 1 or decode_steps={self.config.decode_steps} "
                             "steps per dispatch")
        rows = _round_up(max(active, default=0) + 1, self.decode_rows)
        mask = np.zeros(rows, np.bool_)
        mask[active] = True
        longest = int(self._host_len[active].max()) if active else 0
        if longest + steps > self.max_len:
            raise ValueError(f"a slot would pass max_len={self.max_len} within {steps} step(s); "
                             "the driver must stop it first")
        span = _round_up(longest + steps, self.spans)  # cached positions and the new tokens'
        greedy = not any(self._sampled[active])
        self.last_decode_variant = (rows, span)
        want_top = np.bool_(any(self._want_top.get(s, 0) > 0 for s in active))
        kind = "decode" if steps == 1 else "decode_k"
        out = self._call((kind, rows, span, greedy), span, mask, want_top)
        self._host_len[active] += steps
        return _Step(out, active, dict(self._want_top), steps if steps > 1 else 0)

    def release(self, slot: int) -> None:
        self._host_len[slot] = 0
        self._sampled[slot] = False
        self._want_top.pop(slot, None)

    def slot_length(self, slot: int) -> int:
        return int(self._host_len[slot])

    # --- scoring ----------------------------------------------------------

    def score_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[ScoreOutput]:
        """log p(continuation | context) for each pair; only the needed
        log-probabilities are gathered, chunk by chunk.

        Pairs that pad to the same length bucket are packed into one call of up
        to ``num_slots`` rows (rows are independent: each is masked to its own
        length), so many short sequences score at batched speed. Row counts are
        powers of two, and a call's full-vocabulary logits chunk stays under
        ``_SCORE_LOGITS_ELEMS`` floats."""
        seqs: list[list[int]] = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("score needs a non-empty context and a non-empty continuation")
            seq = list(context) + list(continuation)
            if len(seq) > self.max_len:
                raise ValueError(f"context + continuation = {len(seq)} tokens exceeds max_len={self.max_len}")
            seqs.append(seq)
        by_bucket: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            by_bucket.setdefault(_round_up(len(seq) - 1, self._score_buckets()), []).append(i)
        rows_lp: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for T, idx in by_bucket.items():
            C = min(self.config.score_chunk, T)
            most = max(1, min(self.num_slots, _SCORE_LOGITS_ELEMS // (C * self.cfg.vocab_size)))
            for off in range(0, len(idx), most):
                group = idx[off : off + most]
                P = min(1 << (len(group) - 1).bit_length(), most)
                tokens = np.zeros((P, T), np.int32)
                targets = np.zeros((P, T), np.int32)
                for r, i in enumerate(group):
                    seq = seqs[i]
                    tokens[r, : len(seq) - 1] = seq[:-1]
                    targets[r, : len(seq) - 1] = seq[1:]
                lp, top, top_lp = self._score_fn(self.params, tokens, targets)  # rows are causal: padding after is harmless
                lp, top, top_lp = np.asarray(lp), np.asarray(top), np.asarray(top_lp)
                for r, i in enumerate(group):
                    rows_lp[i] = (lp[r], top[r], top_lp[r])
        results: list[ScoreOutput] = []
        for i, (context, continuation) in enumerate(pairs):
            lp, top, top_lp = rows_lp[i]
            sl = slice(len(context) - 1, len(seqs[i]) - 1)
            results.append(
                ScoreOutput(
                    logprob=float(np.sum(lp[sl], dtype=np.float64)),
                    token_logprobs=tuple(float(x) for x in lp[sl]),
                    is_greedy=bool((top[sl] == np.asarray(continuation)).all()),
                    context_ids=tuple(context),
                    continuation_ids=tuple(continuation),
                    top_ids=tuple(int(x) for x in top[sl]),
                    top_logprobs=tuple(float(x) for x in top_lp[sl]),
                )
            )
        return results

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> ScoreOutput:
        return self.score_batch([(context, continuation)])[0]

    def _score_buckets(self) -> tuple[int, ...]:
        c = self.config.score_chunk
        b = [x for x in self.config.prefill_buckets if x % c == 0 or x < c]
        return tuple(sorted(set(b) | {s for s in self.spans if s % min(c, s) == 0}))

    # --- reporting ----------------------------------------------------------

    def stats(self) -> EngineStats:
        cache_dtype = self.state.cache.dtype
        bpt = KVCache.bytes_per_token(self.cfg, cache_dtype)
        return EngineStats(
            num_slots=self.num_slots,
            max_len=self.max_len,
            cache_bytes=bpt * self.cache_rows * self.max_len,
            bytes_per_token=bpt,
            prefill_buckets=self.config.prefill_buckets,
            compiled=dict(self.compile_seconds),
        )

    def describe(self) -> str:
        s = self.stats()
        return (
            f"{self.name}: {self.num_slots} slots x {self.max_len} tokens, KV cache {s.cache_bytes / 2**20:.1f} MiB "
            f"({s.bytes_per_token} B/token, {self.state.cache.dtype}), weights {self.dtype}"
            + (f" (checkpoint {self.checkpoint_dtype})" if self.checkpoint_dtype != self.dtype else "") + ", "
            f"mesh {shd.describe(self.mesh)}"
        )


def param_bytes(engine: Engine) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(engine.params))


__all__ = ["Engine", "EngineConfig", "DecodeState", "enable_compilation_cache", "param_bytes"]
