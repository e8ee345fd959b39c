"""The compiled engine: prefill, decode and score over one paged KV pool.

* One pool of KV pages (:mod:`jaxinfer.engine.pages`), sized once from a
  memory budget, and the per-row decode state (last token, length, sampling
  parameters, penalty counts) live on the device and are donated to every
  call. Which pages belong to which sequence is the caller's business (the
  block manager); every call gets the page tables it needs.
* ``prefill`` writes a piece of a sequence at an offset (earlier positions
  already in its pages) and, for its last piece, samples the first token and
  arms a decode row. ``decode`` runs one step (or k) for any set of rows and
  feeds the sampled tokens back on the device, so steps can be dispatched
  before the host has read the previous step's tokens. ``score`` is a prefill
  that also returns every position's log-probabilities.
* Shapes pad to buckets: token counts (``prefill_buckets``), page-table widths
  (powers of two pages, up to ``max_len``) and decode row counts
  (``decode_batches`` and ``max_seqs``). The programs are compiled ahead of
  time (:meth:`Engine.compile`); a serving call only runs compiled programs,
  choosing the smallest compiled one that fits, so nothing compiles while
  serving.
* Weights, state and pool are placed on a ``("data", "model")`` mesh by the
  logical axis rules in :mod:`jaxinfer.sharding`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer import sharding as shd
from jaxinfer.config import ModelConfig
from jaxinfer.engine import programs
from jaxinfer.engine.config import CPU_KV_CACHE_BYTES, MAX_LEN_CAP, EngineConfig
from jaxinfer.engine.pages import INT8, POOL_AXES, SCALE_AXES, SCALE_DTYPE, KVPool
from jaxinfer.engine.programs import DecodeState
from jaxinfer.engine.handles import StepResult
from jaxinfer.engine.sampling import Sampled, SlotSampling
from jaxinfer.engine.types import EngineStats, SamplingParams, ScoreOutput, SlotToken
from jaxinfer.model import quant as qt
from jaxinfer.model.transformer import Transformer, params_tree
from jaxinfer.model.weights import flatten, nest, weight_specs

log = logging.getLogger(__name__)
MIN_CONTEXT = 128  # the narrowest page-table bucket covers this many positions


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Persistent XLA compilation cache, so a second start does not recompile."""
    d = Path(directory or os.environ.get("JAXINFER_XLA_CACHE", Path.home() / ".cache" / "jaxinfer" / "xla"))
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return d


def _round_up(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    return tuple(out) + (hi,)


class Engine:
    """Prefill/decode/score over one model on one mesh (the
    :class:`~jaxinfer.engine.types.EngineProtocol`). Not thread-safe: one
    driver (the scheduler thread, or a test) calls it."""

    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(), *, mesh: Mesh | None = None,
                 tokenizer=None, name: str = ""):
        config.check()
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.mesh = mesh or shd.make_mesh()
        self.tokenizer = tokenizer
        self.name = name or self.cfg.name
        self.platform = self.mesh.devices.flat[0].platform
        t0 = time.perf_counter()
        self.graphdef, self.params, self.checkpoint_dtype, self.dtype = self._place_weights(model)
        self.cache_dtype = jnp.dtype(config.cache_dtype or self.dtype)
        self.bytes_per_token = KVPool.bytes_per_token(self.cfg, self.cache_dtype)
        self.page_size = config.page_size
        self.pool_bytes_budget = self._pool_budget()
        self.num_pages = int(self.pool_bytes_budget // (self.page_size * self.bytes_per_token))
        if self.num_pages < 1:
            raise ValueError(f"kv_cache_bytes={self.pool_bytes_budget} holds no page of {self.page_size} tokens "
                             f"({self.page_size * self.bytes_per_token} B per page)")
        model_len = min(self.cfg.max_position_embeddings, MAX_LEN_CAP)
        self.max_len = min(config.max_len or model_len, self.num_pages * self.page_size)
        if config.max_len and config.max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_len={config.max_len} exceeds the model's "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        self.max_seqs = config.max_seqs
        self.prefill_buckets = tuple(sorted({min(b, self.max_len) for b in config.prefill_buckets}))
        self.prefill_chunk = self.prefill_buckets[-1]
        self.prefill_rows = config.prefill_rows
        max_pages = math.ceil(self.max_len / self.page_size)
        self.widths = _pow2_buckets(math.ceil(MIN_CONTEXT / self.page_size), max_pages)
        self.decode_batches = tuple(sorted({min(b, self.max_seqs) for b in config.decode_batches} | {self.max_seqs}))
        try:
            self._place_state()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise ValueError(self._out_of_memory()) from e
        self._abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                      (self.params, self.state, self.pool))
        self._host_len = np.zeros(self.max_seqs, np.int64)  # positions each row holds (by this engine's calls)
        self._sampled = np.zeros(self.max_seqs, np.bool_)  # row samples (temperature > 0)
        self._want_top: dict[int, int] = {}
        self._partial: dict[int, int] = {}  # row -> end of its prompt's pieces so far (before the last)
        self._seeds = np.random.default_rng()  # unseeded requests: a fresh seed each
        self._compiled: dict[tuple, object] = {}
        self._lock = threading.Lock()  # guards _compiled against the background compile thread
        self.compile_seconds: dict[str, float] = {}
        self.place_seconds = time.perf_counter() - t0
        self._build_jits()

    # --- construction ------------------------------------------------------

    def _place_weights(self, model: Transformer):
        """Every weight placed by the sharding rules, in the dtype the engine
        computes in, quantized first when ``config.quantize`` asks. bfloat16
        weights on CPU are held as float32 unless ``weight_dtype`` says
        otherwise: XLA CPU has no bfloat16 matmul, so it would convert every
        weight on every call (about 10x slower, measured on the previous
        engine); float32 holds every bfloat16 value exactly."""
        flat = flatten(params_tree(model))
        ckpt_dtype = jnp.dtype(flat["final_norm"].dtype)
        if self.config.weight_dtype is not None:
            dtype = jnp.dtype(self.config.weight_dtype)
        elif ckpt_dtype == jnp.bfloat16 and self.platform == "cpu":
            dtype = jnp.dtype(jnp.float32)
        else:
            dtype = ckpt_dtype
        fmt = model.quant or self.config.quantize
        if model.quant and self.config.quantize and model.quant != self.config.quantize:
            raise ValueError(f"EngineConfig.quantize={self.config.quantize!r}: the checkpoint is already "
                             f"{model.quant}; convert the float checkpoint instead")
        specs = weight_specs(self.cfg, fmt)
        shardings = shd.weight_shardings(self.cfg, self.mesh, quant=fmt)
        placed = {}
        for name, a in flat.items():
            if model.quant is None and fmt is not None and specs[name].contract:
                stored = [n for n in specs if n == name or n.startswith(f"{name}_")]
                quantize = jax.jit(functools.partial(qt.quantize_weight, name, spec=weight_specs(self.cfg)[name],
                                                     quant=fmt), out_shardings={n: shardings[n] for n in stored})
                placed.update(quantize(a))
                continue
            want = jnp.dtype(specs[name].dtype or dtype)
            cast = jax.jit(lambda x, want=want: x.astype(want), out_shardings=shardings[name])
            placed[name] = cast(a) if a.dtype != want or getattr(a, "sharding", None) != shardings[name] else a
        self.quant = fmt
        self.matmul = qt.choose_matmul(self.platform, self.config.int8_matmul, fmt) if fmt else None
        model = Transformer(self.cfg, params=nest(placed), matmul=self.matmul or "weight-only",
                            int8_rows=qt.min_rows(self.platform))
        graphdef, params = nnx.split(model)
        return graphdef, params, ckpt_dtype, dtype

    def _pool_budget(self) -> int:
        """Bytes for the KV pool: kv_cache_bytes, else CPU_KV_CACHE_BYTES on
        CPU, else kv_cache_fraction of the memory each device has free now
        (after the weights), times the devices a pool copy spans... the pool is
        replicated over ``data``, so the budget is one device's share times the
        ``model`` devices it is split over (where kv heads divide)."""
        if self.config.kv_cache_bytes:
            return self.config.kv_cache_bytes
        if self.platform == "cpu":
            return CPU_KV_CACHE_BYTES
        stats = self.mesh.devices.flat[0].memory_stats() or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        if free <= 0:
            raise ValueError("the device reports no free memory; set EngineConfig.kv_cache_bytes (--kv-cache-memory)")
        split = self.mesh.shape["model"] if self.cfg.num_kv_heads % self.mesh.shape["model"] == 0 else 1
        return int(free * self.config.kv_cache_fraction) * split

    def _out_of_memory(self) -> str:
        """What to change when the pool and the decode state do not fit the device."""
        if self.config.kv_cache_bytes:
            budget = "--kv-cache-memory (EngineConfig.kv_cache_bytes)"
        elif self.platform == "cpu":
            budget = "the CPU default of --kv-cache-memory"
        else:
            budget = f"kv_cache_fraction={self.config.kv_cache_fraction:g} of the free device memory"
        pool = self.num_pages * self.page_size * self.bytes_per_token
        return (f"out of device memory allocating the KV cache pool: {self.num_pages} pages x {self.page_size} "
                f"tokens = {pool / 2**20:.1f} MiB ({budget}) plus the decode state of --max-seqs={self.max_seqs} "
                f"rows; lower --kv-cache-memory or --max-seqs")

    def _place_state(self) -> None:
        m, R, V = self.mesh, self.max_seqs, self.cfg.vocab_size
        pool_shape = KVPool.shape(self.cfg, self.num_pages, self.page_size)
        pool_sh = shd.named_sharding(POOL_AXES, pool_shape, m, what="kv pool")
        zeros = jax.jit(lambda: jnp.zeros(pool_shape, self.cache_dtype), out_shardings=pool_sh)
        if self.cache_dtype == INT8:  # int8 keys and values, a float32 scale per token and kv head
            scale_sh = shd.named_sharding(SCALE_AXES, pool_shape[:-1], m, what="kv pool scales")
            scales = jax.jit(lambda: jnp.zeros(pool_shape[:-1], SCALE_DTYPE), out_shardings=scale_sh)
            self._pool_sharding = KVPool(pool_sh, pool_sh, scale_sh, scale_sh)
            self.pool = KVPool(zeros(), zeros(), scales(), scales())
        else:
            self._pool_sharding = KVPool(pool_sh, pool_sh)
            self.pool = KVPool(zeros(), zeros())
        row = shd.named_sharding(("slots",), (R,), m, what="decode rows")
        row2 = shd.named_sharding(("slots", None), (R, 2), m, what="seeds")
        rv = shd.named_sharding(("slots", "vocab"), (R, V), m, what="token counts")
        self._state_sharding = DecodeState(row, row, SlotSampling(*([row] * 7), seed=row2), rv, rv)
        self.state = jax.jit(lambda: DecodeState.zeros(R, V), out_shardings=self._state_sharding)()

    def _build_jits(self) -> None:
        rep = NamedSharding(self.mesh, PartitionSpec())
        g, sh, psh = self.graphdef, self._state_sharding, self._pool_sharding
        chunk = self.config.score_chunk
        self._jits = {
            "prefill": jax.jit(lambda p, ds, pool, *a: programs.prefill(g, p, ds, pool, *a),
                               donate_argnums=(1, 2), out_shardings=(sh, psh, rep, rep)),
            "decode": jax.jit(lambda p, ds, pool, *a: programs.decode(g, p, ds, pool, *a),
                              donate_argnums=(1, 2), out_shardings=(sh, psh, rep)),
            "score": jax.jit(lambda p, h, t: programs.score(g, p, h, t, chunk=chunk), out_shardings=rep),
        }
        for greedy in (True, False):
            self._jits["sample", greedy] = jax.jit(
                lambda p, ds, *a, greedy=greedy: programs.sample_rows(g, p, ds, *a, greedy_only=greedy),
                donate_argnums=1, out_shardings=(sh, rep))
            k = self.config.decode_steps
            self._jits["decode_k", greedy] = jax.jit(
                lambda p, ds, pool, *a, greedy=greedy: programs.decode_k(g, p, ds, pool, *a, greedy_only=greedy,
                                                                        steps=k),
                donate_argnums=(1, 2), out_shardings=(sh, psh, rep))

    # --- programs ---------------------------------------------------------

    @property
    def prefill_many_limit(self) -> int:
        """Longest piece ``prefill_many`` takes (0: none): the largest bucket
        below the chunk size, when prefill_rows > 1."""
        small = [b for b in self.prefill_buckets if b < self.prefill_chunk]
        return small[-1] if small and self.prefill_rows > 1 else 0

    @property
    def decode_steps(self) -> int:
        return self.config.decode_steps

    def _rows_for(self, T: int) -> int:
        return self.prefill_rows if T <= self.prefill_many_limit else 1

    def _widths_before(self) -> tuple[int, ...]:
        """Page-table widths a prefill may read before its start (start <= max_len - 1)."""
        top = self._width(self.max_len - 1)
        return tuple(w for w in self.widths if w <= top)

    def variants(self) -> list[tuple]:
        """Every program serving can use:

        * ("prefill", rows, tokens, width): a forward, width 0 (nothing before
          the piece) or a page-table bucket for a start up to max_len - 1;
        * ("decode", rows, width): one step's forward;
        * ("sample", rows, greedy_only): the sampler over that many rows;
        * ("score", tokens): scores from a prefill's hidden states;
        * ("decode_k", rows, width, greedy_only) when decode_steps > 1.
        """
        todo = [("prefill", self._rows_for(T), T, W) for T in self.prefill_buckets for W in (0, *self._widths_before())]
        todo += [("decode", B, W) for B in self.decode_batches for W in self.widths]
        todo += [("sample", B, greedy) for B in self.decode_batches for greedy in (True, False)]
        todo += [("score", T) for T in self.prefill_buckets]
        if self.config.decode_steps > 1:
            todo += [("decode_k", B, W, greedy) for B in self.decode_batches for W in self.widths
                     for greedy in (True, False)]
        return todo

    def covering_variants(self) -> list[tuple]:
        """The fewest programs that serve any call: the widest of each kind."""
        wide = self._widths_before()[-1]
        out = [("prefill", self._rows_for(self.prefill_chunk), self.prefill_chunk, wide),
               ("decode", self.max_seqs, self.widths[-1]), ("sample", self.max_seqs, False),
               ("score", self.prefill_chunk)]
        if self.prefill_many_limit:
            out.append(("prefill", self.prefill_rows, self.prefill_many_limit, wide))
        if self.config.decode_steps > 1:
            out.append(("decode_k", self.max_seqs, self.widths[-1], False))
        return out

    def _example_args(self, key: tuple):
        """Arguments to lower ``key``'s program with: the weights, state and pool
        as abstract values (shape, dtype, sharding), so that a background
        compile never touches the buffers a serving call is donating."""
        R, D = self.max_seqs, self.cfg.hidden_size
        params, state, pool = self._abstract
        rep = NamedSharding(self.mesh, PartitionSpec())
        i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        kind = key[0]
        if kind == "prefill":
            _, P, T, W = key
            samp = SlotSampling(**{k: np.stack([v] * P) for k, v in SlotSampling.host_row(SamplingParams(), 0).items()})
            return (params, state, pool, i32(P, T), i32(P), np.ones(P, np.int32), i32(P, T),
                    i32(P, W), np.full(P, R, np.int32), samp, np.ones(P, np.bool_))
        if kind == "decode":
            _, B, W = key
            return params, state, pool, i32(B), np.zeros(B, np.bool_), i32(B, W)
        if kind == "decode_k":
            _, B, W, _ = key
            return params, state, pool, i32(B), np.zeros(B, np.bool_), i32(B, W), np.bool_(False)
        if kind == "sample":
            _, B, _ = key
            hidden = jax.ShapeDtypeStruct((B, D), self.dtype, sharding=rep)
            return params, state, hidden, i32(B), np.zeros(B, np.bool_), np.bool_(False)
        _, T = key
        return params, jax.ShapeDtypeStruct((T, D), self.dtype, sharding=rep), i32(T)

    def _jit_of(self, key: tuple):
        if key[0] in ("sample", "decode_k"):
            return self._jits[key[0], key[-1]]
        return self._jits[key[0]]

    def _compile_one(self, key: tuple) -> None:
        t0 = time.perf_counter()
        exe = self._jit_of(key).lower(*self._example_args(key)).compile()
        with self._lock:
            self._compiled[key] = exe
            self.compile_seconds[" ".join(map(str, key))] = time.perf_counter() - t0

    def compile(self, variants: Sequence[tuple] | None = None, *, progress: bool = True) -> dict[str, float]:
        """Compile the given programs (default: every variant) ahead of time, as
        many at once as there are cores (XLA compiles with the GIL released)."""
        todo = [k for k in (self.variants() if variants is None else variants) if k not in self._compiled]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for i, _ in enumerate(pool.map(self._compile_one, todo), 1):
                if progress:
                    log.info("compiled %d/%d programs", i, len(todo))
        self.compile_seconds["total"] = self.compile_seconds.get("total", 0.0) + time.perf_counter() - t0
        return self.compile_seconds

    def compile_in_background(self) -> threading.Thread:
        """Compile the variants not compiled yet on a thread; calls meanwhile
        use the smallest compiled program that fits (after :meth:`compile` of
        :meth:`covering_variants`, one always does)."""
        def run() -> None:
            self.compile(progress=False)
            log.info("background compile done: %d programs compiled", self.programs_compiled)

        thread = threading.Thread(target=run, name="jaxinfer-compile", daemon=True)
        thread.start()
        return thread

    @property
    def programs_compiled(self) -> int:
        return len(self._compiled)

    @staticmethod
    def _fits(have: tuple, want: tuple) -> bool:
        """Program ``have`` can run a call that needs ``want``: at least as many
        rows, tokens and pages (they only pad more); a greedy-only call may run
        the general sampler, not the other way round; scores need their exact
        token count (the hidden states come from a forward of that count)."""
        if have[0] != want[0]:
            return False
        kind = have[0]
        if kind == "score":
            return have == want
        if kind in ("sample", "decode_k"):
            sizes_ok = all(a >= b for a, b in zip(have[1:-1], want[1:-1]))
            return sizes_ok and (have[-1] == want[-1] or not have[-1])
        return all(a >= b for a, b in zip(have[1:], want[1:]))

    def _exe(self, key: tuple):
        """The program for ``key``: its own if compiled, else the smallest
        compiled one that can run the call (see :meth:`_fits`)."""
        with self._lock:
            exe = self._compiled.get(key)
            if exe is not None:
                return key, exe
            fits = [k for k in self._compiled if self._fits(k, key)]
            if fits:
                best = min(fits, key=lambda k: tuple(not x if isinstance(x, bool) else x for x in k[1:]))
                return best, self._compiled[best]
        if not self.config.lazy_compile:
            raise RuntimeError(f"engine program {key} was not compiled; call Engine.compile() before serving")
        self._compile_one(key)
        return key, self._compiled[key]

    def _sample(self, hidden, rows: Sequence[int], width: int, greedy: bool, want_top: bool) -> Sampled:
        """Run the sampler over ``rows`` (padded to a compiled row count >= width)."""
        key, exe = self._exe(("sample", width, greedy))
        B = key[1]
        rows_a = np.full(B, self.max_seqs, np.int32)
        rows_a[: len(rows)] = rows
        active = np.zeros(B, np.bool_)
        active[: len(rows)] = True
        if hidden.shape[0] < B:  # a prefill's few rows, or a decode before its own sampler is compiled
            host = np.asarray(hidden)
            hidden = np.concatenate([host, np.zeros((B - host.shape[0], host.shape[1]), host.dtype)])
        self.state, out = exe(self.params, self.state, hidden, rows_a, active, np.bool_(want_top))
        return out

    # --- host-side checks ----------------------------------------------------

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.max_seqs:
            raise ValueError(f"row {row} out of range [0, max_seqs={self.max_seqs})")

    def _check_pages(self, pages: Sequence[int], covers: int, what: str) -> None:
        if len(pages) * self.page_size < covers:
            raise ValueError(f"{what}: {len(pages)} pages of {self.page_size} cover {len(pages) * self.page_size} "
                             f"positions, need {covers}")
        bad = [p for p in pages if not 0 <= p < self.num_pages]
        if bad:
            raise ValueError(f"{what}: page ids {bad[:4]} out of range [0, num_pages={self.num_pages})")

    def _width(self, positions: int) -> int:
        return 0 if positions == 0 else _round_up(math.ceil(positions / self.page_size), self.widths, "pages")

    # --- the protocol the scheduler uses ----------------------------------

    def prefill(self, row: int, tokens: Sequence[int], params: SamplingParams, *, pages: Sequence[int],
                start: int = 0, last: bool = True) -> SlotToken | None:
        out = self._prefill([(row, tokens, params, start, pages, last)])
        return out[0] if last else None

    def prefill_many(self, items) -> list[SlotToken]:
        """Prefill several whole prompts (or their remainders after a cached
        prefix), ``(row, tokens, params, start, pages)`` each, in one call and
        sample each one's first token: at most ``prefill_rows`` of them, each
        at most ``prefill_many_limit`` tokens."""
        items = list(items)
        if not 1 <= len(items) <= self.prefill_rows:
            raise ValueError(f"prefill_many takes 1 to prefill_rows={self.prefill_rows} prompts, got {len(items)}")
        if len(items) > 1 and max(len(it[1]) for it in items) > self.prefill_many_limit:
            raise ValueError(f"prefill_many takes prompts of at most {self.prefill_many_limit} tokens")
        rows = [it[0] for it in items]
        if len(set(rows)) != len(rows):
            raise ValueError(f"prefill_many: rows {rows} must be distinct")
        return self._prefill([(*it, True) for it in items])

    def _prefill(self, pieces: list, targets: Sequence[int] | None = None):
        """pieces: (row, tokens, params, start, pages, last). Returns the
        sampled tokens, or the Scores of the first piece with ``targets``."""
        ps, trash = self.page_size, self.num_pages
        for row, tokens, params, start, pages, last in pieces:
            if row is not None:
                self._check_row(row)
            n = len(tokens)
            if n == 0:
                raise ValueError("empty prompt")
            if n > self.prefill_chunk:
                raise ValueError(f"prefill piece of {n} tokens exceeds prefill_chunk={self.prefill_chunk}")
            if start < 0 or start + n > self.max_len:
                raise ValueError(f"positions {start}..{start + n - 1} do not fit max_len={self.max_len}")
            self._check_pages(pages, start + n, "prefill")
        T = _round_up(max(len(p[1]) for p in pieces), self.prefill_buckets, "prefill length")
        W = self._width(max(p[3] for p in pieces))
        if targets is not None:  # a forward of exactly the token count of a compiled score head
            T = self._score_tokens(T, W)
        want = ("prefill", self._rows_for(T) if len(pieces) > 1 else 1, T, W)
        key, exe = self._exe(want)
        _, P, T, W = key
        if len(pieces) > P:
            raise RuntimeError(f"no compiled prefill program takes {len(pieces)} prompts")
        tokens = np.zeros((P, T), np.int32)
        start_a, n_a = np.zeros(P, np.int32), np.ones(P, np.int32)
        write_at = np.full((P, T), trash * ps, np.int32)
        table = np.full((P, W), trash, np.int32)
        rows_a = np.full(P, self.max_seqs, np.int32)
        fresh = np.ones(P, np.bool_)
        samp_rows = [SlotSampling.host_row(SamplingParams(), 0)] * P
        for i, (row, toks, params, start, pages, last) in enumerate(pieces):
            n = len(toks)
            tokens[i, :n] = toks
            start_a[i], n_a[i] = start, n
            pos = np.arange(start, start + n)
            pg = np.asarray(pages, np.int64)
            write_at[i, :n] = pg[pos // ps] * ps + pos % ps
            before = math.ceil(start / ps)
            table[i, :before] = pg[:before]
            if row is not None:
                rows_a[i] = row
                fresh[i] = self._partial.get(row) != start  # else its earlier piece's penalty state carries on
                seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**63))
                samp_rows[i] = SlotSampling.host_row(params, seed)
        samp = SlotSampling(**{k: np.stack([r[k] for r in samp_rows]) for k in samp_rows[0]})
        self.state, self.pool, last_h, hidden0 = exe(self.params, self.state, self.pool, tokens, start_a, n_a,
                                                     write_at, table, rows_a, samp, fresh)
        for row, toks, params, start, pages, last in pieces:
            if row is None:
                continue
            self._host_len[row] = start + len(toks)
            if last:
                self._partial.pop(row, None)
            else:
                self._partial[row] = start + len(toks)
            self._want_top[row] = params.logprobs
            self._sampled[row] = params.temperature > 0
        if targets is not None:
            tgt = np.zeros(T, np.int32)
            tgt[: len(targets)] = targets
            return self._exe(("score", T))[1](self.params, hidden0, tgt)
        armed = [i for i, p in enumerate(pieces) if p[5]]  # pieces that end their prompt are sampled
        if not armed:
            return []
        greedy = all(pieces[i][2].temperature == 0 for i in armed)
        want_top = any(pieces[i][2].logprobs for i in armed)
        if armed != list(range(len(armed))):
            raise ValueError("prefill_many: every piece must end its prompt")
        out = self._sample(last_h, [pieces[i][0] for i in armed], P, greedy, want_top)
        res = StepResult(out, armed, {i: pieces[i][2].logprobs for i in armed}, 1).result()
        return [res[i] for i in armed]

    def _score_tokens(self, T: int, W: int) -> int:
        """The smallest token count >= T with a compiled score head and a
        compiled one-piece forward of exactly that count reading >= W pages."""
        with self._lock:
            for t in self.prefill_buckets:
                if t >= T and ("score", t) in self._compiled and any(
                        k[0] == "prefill" and k[2] == t and k[3] >= W for k in self._compiled):
                    return t
        if self.config.lazy_compile:
            return T
        raise RuntimeError(f"no compiled score program takes {T} tokens; call Engine.compile() before serving")

    def decode(self, rows: Sequence[int], pages, steps: int = 1) -> StepResult:
        """Dispatch ``steps`` decode steps for ``rows`` (pages[row]: the row's
        page table covering its length + steps positions) and return at once."""
        rows = [int(r) for r in rows]
        if steps not in (1, self.config.decode_steps):
            raise ValueError(f"steps={steps}: this engine decodes 1 or decode_steps={self.config.decode_steps} "
                             "steps per dispatch")
        if not rows:
            raise ValueError("decode needs at least one row")
        for r in rows:
            self._check_row(r)
            end = int(self._host_len[r]) + steps
            if end > self.max_len:
                raise ValueError(f"row {r} would pass max_len={self.max_len} within {steps} step(s)")
            self._check_pages(pages[r], end, f"decode row {r}")
        B = _round_up(len(rows), self.decode_batches, "decode rows")
        W = self._width(max(int(self._host_len[r]) + steps for r in rows))
        greedy = bool(not any(self._sampled[rows]))
        want_top = any(self._want_top.get(r, 0) > 0 for r in rows)
        key, exe = self._exe(("decode", B, W) if steps == 1 else ("decode_k", B, W, greedy))
        B, W = key[1], key[2]
        rows_a = np.full(B, self.max_seqs, np.int32)
        rows_a[: len(rows)] = rows
        active = np.zeros(B, np.bool_)
        active[: len(rows)] = True
        table = np.full((B, W), self.num_pages, np.int32)
        for i, r in enumerate(rows):
            pg = list(pages[r])[:W]
            table[i, : len(pg)] = pg
        self.last_decode_program = key
        if steps == 1:
            self.state, self.pool, hidden = exe(self.params, self.state, self.pool, rows_a, active, table)
            out = self._sample(hidden, rows, B, greedy, want_top)
        else:
            self.state, self.pool, out = exe(self.params, self.state, self.pool, rows_a, active, table,
                                             np.bool_(want_top))
        self._host_len[rows] += steps
        return StepResult(out, rows, dict(self._want_top), steps)

    def recover(self) -> bool:
        """After a failed call: True when the decode state or the pool went with it (a program that
        failed after taking its donated buffers, or a step whose outputs failed on the device); fresh
        zeroed ones replace them, every row released, every page's contents gone."""
        try:
            jax.block_until_ready((self.state, self.pool))
            return False
        except Exception:
            log.error("the engine lost its device state with a failed call: reallocating the decode state and the KV pool")
        self._place_state()
        self._host_len[:] = 0
        self._sampled[:] = False
        self._want_top.clear()
        self._partial.clear()
        return True

    def release(self, row: int) -> None:
        self._host_len[row] = 0
        self._sampled[row] = False
        self._want_top.pop(row, None)
        self._partial.pop(row, None)

    def row_length(self, row: int) -> int:
        return int(self._host_len[row])

    def score(self, tokens: Sequence[int], targets: Sequence[int], *, pages: Sequence[int],
              start: int = 0) -> ScoreOutput:
        """Run ``tokens`` at positions start.. (writing their K/V into ``pages``)
        and return log p(targets[i] | sequence up to tokens[i]) for every i."""
        if len(tokens) != len(targets):
            raise ValueError(f"score: {len(tokens)} tokens but {len(targets)} targets")
        s = self._prefill([(None, tokens, SamplingParams(), start, pages, False)], targets=targets)
        n = len(tokens)
        lp, top, top_lp = (np.asarray(a)[:n] for a in (s.logprob, s.top_id, s.top_logprob))
        return ScoreOutput(
            logprob=float(np.sum(lp, dtype=np.float64)),
            token_logprobs=tuple(float(x) for x in lp),
            is_greedy=bool((top == np.asarray(targets)).all()),
            top_ids=tuple(int(x) for x in top),
            top_logprobs=tuple(float(x) for x in top_lp),
        )

    # --- reporting ----------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            max_seqs=self.max_seqs, max_len=self.max_len, page_size=self.page_size, num_pages=self.num_pages,
            pool_bytes=self.pool_bytes, bytes_per_token=self.bytes_per_token, prefill_buckets=self.prefill_buckets,
            programs=self.programs_compiled, compiled=dict(self.compile_seconds),
        )

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes

    @property
    def kv_dtype(self) -> str:
        """The pool's format: the cache dtype, and for int8 its scales'."""
        return f"int8 + {SCALE_DTYPE} scale per token and kv head" if self.pool.quantized else str(self.cache_dtype)

    def describe(self) -> str:
        s = self.stats()
        return (
            f"{self.name}: {s.max_seqs} decode rows, KV pool {s.num_pages} pages x {s.page_size} tokens "
            f"= {s.num_pages * s.page_size} tokens, {s.pool_bytes / 2**20:.1f} MiB ({s.bytes_per_token} B/token, "
            f"{self.kv_dtype}), max_len {s.max_len}, weights {self.dtype}"
            + (f" (checkpoint {self.checkpoint_dtype})" if self.checkpoint_dtype != self.dtype else "")
            + (f", {self.quant} projections ({self.matmul} matmuls)" if self.quant else "")
            + f", {param_bytes(self) / 2**20:.1f} MiB of weights"
            + f", {s.programs} programs compiled in {s.compiled.get('total', 0.0):.1f}s, mesh {shd.describe(self.mesh)}"
        )


def param_bytes(engine: Engine) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(engine.params))


__all__ = ["Engine", "EngineConfig", "DecodeState", "enable_compilation_cache", "param_bytes"]
