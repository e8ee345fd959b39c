"""One model served across several processes (hosts) with JAX's multi-controller runtime.

Every process runs ``jaxinfer serve`` with the same flags plus its process id:

* :func:`initialize` calls ``jax.distributed.initialize`` (coordinator address, process
  count and id from flags or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``), with the gloo collectives on CPU and a heartbeat timeout;
* the mesh spans every process's devices and each process restores only its own shards
  of the checkpoint (``load_checkpoint(path, mesh=global_mesh)``);
* process 0 serves gRPC and runs the scheduler over a :class:`LockstepEngine`: every
  engine call (prefill with its tokens, pages and sampling parameters, decode with its
  rows and their page tables, release, score) is first broadcast to the other processes as a fixed-size int32
  command with ``jax.experimental.multihost_utils.broadcast_one_to_all``, then run;
* the other processes run :func:`follow`: receive a command, make the same engine call,
  until process 0 sends STOP. So every process dispatches the same compiled programs in
  the same order, which is what their collectives need. Sampled tokens come out
  replicated; only process 0 reads them.

Failures end the group instead of hanging it. JAX's coordination service notices a process
that stops sending heartbeats (``--heartbeat-timeout``) or whose connection drops, and
terminates every other process ("Terminating process because the JAX distributed service
detected fatal errors ... another task died"). A follower whose engine call fails with
anything but the deterministic validation errors (``ValueError``, which process 0 meets in
the same call) exits, so process 0 follows it down. While the server is idle, process 0
broadcasts a no-op every ``keepalive_s`` seconds, so followers never sit in one collective
long enough to hit XLA's CPU collective timeout (30 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxinfer.checkpoint import is_checkpoint
from jaxinfer.engine.types import SamplingParams, ScoreOutput, SlotToken, StepHandle
from jaxinfer.sharding import MeshShape

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
KEEPALIVE_S = 60.0


# -- start-up ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """Where this process sits in a multi-process group."""

    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    heartbeat_timeout_s: int = 30
    initialization_timeout_s: int = 300

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @classmethod
    def resolve(
        cls,
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        *,
        environ: dict[str, str] | None = None,
        **timeouts: int,
    ) -> ClusterSpec | None:
        """Flags first, then the environment; None when this is a single process."""
        env = os.environ if environ is None else environ

        def from_env(name: str) -> int | None:
            value = env.get(name)
            if value in (None, ""):
                return None
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"${name}={value!r} is not an integer") from None

        coordinator = coordinator or env.get(ENV_COORDINATOR) or None
        num_processes = num_processes if num_processes is not None else from_env(ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else from_env(ENV_PROCESS_ID)
        if num_processes is None or num_processes == 1:
            if process_id not in (None, 0):
                raise ValueError(f"process id {process_id} given without --num-processes/${ENV_NUM_PROCESSES}")
            return None
        if num_processes < 1:
            raise ValueError(f"--num-processes={num_processes} must be >= 1")
        if not coordinator:
            raise ValueError(
                f"--num-processes={num_processes} needs --coordinator (or ${ENV_COORDINATOR}): "
                "host:port of process 0, reachable from every process"
            )
        if process_id is None:
            raise ValueError(f"--num-processes={num_processes} needs --process-id (or ${ENV_PROCESS_ID})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id={process_id} must be in [0, {num_processes})")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator={coordinator!r} must be host:port")
        return cls(coordinator, num_processes, process_id, **timeouts)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 30,
    initialization_timeout_s: int = 300,
) -> ClusterSpec | None:
    """``jax.distributed.initialize`` from flags or the environment (see :meth:`ClusterSpec.resolve`).

    Must run before anything touches a JAX backend. Returns None (and initializes nothing)
    for a single process."""
    spec = ClusterSpec.resolve(
        coordinator, num_processes, process_id,
        heartbeat_timeout_s=heartbeat_timeout_s, initialization_timeout_s=initialization_timeout_s,
    )
    if spec is None:
        return None
    # CPU devices talk through gloo (GPUs use NCCL and TPUs their interconnect whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info(
        "process %d/%d: joining %s (heartbeat timeout %ds)",
        spec.process_id, spec.num_processes, spec.coordinator, spec.heartbeat_timeout_s,
    )
    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        initialization_timeout=spec.initialization_timeout_s,
        heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
        # A clean stop waits this long at the shutdown barrier for the other processes.
        shutdown_timeout_seconds=max(spec.heartbeat_timeout_s, 10),
    )
    log.info(
        "process %d/%d: %d local of %d devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform,
    )
    return spec


def mesh_spec(spec: str | None) -> str:
    """The serving mesh of a multi-process group, checked to span every process's devices.
    Default: every device on ``model``."""
    shape = MeshShape.parse(spec) if spec else MeshShape(1, jax.device_count())
    if shape.size != jax.device_count():
        raise ValueError(
            f"mesh {shape} covers {shape.size} devices, but the {jax.process_count()} processes have "
            f"{jax.device_count()} ({jax.local_device_count()} each): a multi-process mesh must use every "
            f"device, e.g. --mesh data={jax.process_count()},model={jax.local_device_count()}"
        )
    return str(shape)


def checkpoint_dir(model: str) -> Path:
    """Multi-process serving reads a converted checkpoint (each process restores only its shards);
    it does not convert, since conversion would race across processes and hosts."""
    path = Path(model).expanduser()
    if not is_checkpoint(path):
        raise ValueError(
            f"multi-process serving needs a converted checkpoint directory that every process can read; "
            f"{model!r} is not one: run `jaxinfer convert {model} DIR` once and pass --model DIR"
        )
    return path


def shutdown() -> None:
    jax.distributed.shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags of a multi-process group (each also read from the environment)."""
    g = p.add_argument_group(
        "multi-host (one model over several processes: JAX multi-controller)",
        "Run the same command in every process with its own --process-id. Process 0 serves gRPC; the others "
        "run the same compiled steps and serve nothing. --model must be a converted checkpoint directory that "
        "every process can read; --mesh must span every process's devices (default: all of them on model).",
    )
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordination service (env ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"processes in the group (env ${ENV_NUM_PROCESSES}; unset or 1: a single process)")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index; 0 serves gRPC, the others follow it (env ${ENV_PROCESS_ID})")
    g.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds without heartbeats after which a process counts as dead and the others exit")


def from_args(args: argparse.Namespace) -> ClusterSpec | None:
    return initialize(
        args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_s=args.heartbeat_timeout
    )


# -- the command channel ----------------------------------------------------------------------------


class Op(enum.IntEnum):
    NOOP = 0  # keep-alive; also carries pending releases
    PREFILL = 1
    DECODE = 2
    SCORE = 3
    STOP = 4


# Header layout (int32). Floats travel as their float32 bits; the 64-bit seed as two words.
_OP, _SEQ, _PAYLOAD, _ROW, _START, _LAST, _STEPS = range(7)
_PARAMS = 7  # SamplingParams from here: 2 ints, 6 floats, has_seed, 2 seed words
_INT_FIELDS = ("top_k", "logprobs")
_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
)
_SEED = _PARAMS + len(_INT_FIELDS) + len(_FLOAT_FIELDS)  # has_seed, high word, low word
_HEAD = _SEED + 3


def _pack_params(p: SamplingParams) -> np.ndarray:
    ints = np.array([getattr(p, f) for f in _INT_FIELDS], np.int32)
    floats = np.array([getattr(p, f) for f in _FLOAT_FIELDS], np.float32).view(np.int32)
    seed = 0 if p.seed is None else p.seed
    words = np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32).view(np.int32)
    return np.concatenate([ints, floats, [int(p.seed is not None)], words]).astype(np.int32)


def _unpack_params(a: np.ndarray) -> SamplingParams:
    n_int, n_float = len(_INT_FIELDS), len(_FLOAT_FIELDS)
    ints = {f: int(v) for f, v in zip(_INT_FIELDS, a[:n_int])}
    floats = {f: float(v) for f, v in zip(_FLOAT_FIELDS, a[n_int : n_int + n_float].view(np.float32))}
    has_seed, words = a[n_int + n_float], a[n_int + n_float + 1 :].view(np.uint32)
    seed = (int(words[0]) << 32) | int(words[1]) if has_seed else None
    return SamplingParams(seed=seed, **ints, **floats)


def _payload_bucket(n: int) -> int:
    """Payloads pad to a power of two (at least 64), so few broadcast shapes ever compile."""
    return max(64, 1 << max(0, n - 1).bit_length())


def _pack_lists(lists: Sequence[Sequence[int]]) -> np.ndarray:
    """[count, len_0 .. len_k-1, items of list 0, items of list 1, ...]."""
    flat = [len(lists), *(len(x) for x in lists)]
    for x in lists:
        flat.extend(int(v) for v in x)
    return np.asarray(flat, np.int32)


def _unpack_lists(a: np.ndarray) -> list[tuple[int, ...]]:
    k = int(a[0])
    lens, at, out = a[1 : 1 + k], 1 + k, []
    for n in lens:
        out.append(tuple(int(v) for v in a[at : at + n]))
        at += int(n)
    return out


@dataclass
class Command:
    op: Op
    seq: int = 0  # set by the channel: followers check that none was missed
    row: int = 0  # prefill
    start: int = 0  # prefill, score
    last: bool = True  # prefill
    steps: int = 1  # decode
    params: SamplingParams | None = None  # prefill
    tokens: tuple[int, ...] = ()  # prefill, score
    targets: tuple[int, ...] = ()  # score
    pages: tuple[tuple[int, ...], ...] = ()  # prefill, score: one table; decode: one per row
    rows: tuple[int, ...] = ()  # decode
    released: tuple[int, ...] = ()  # rows released since the previous command

    def lists(self) -> list[tuple[int, ...]]:
        if self.op == Op.PREFILL:
            return [self.tokens, *self.pages]
        if self.op == Op.SCORE:
            return [self.tokens, self.targets, *self.pages]
        if self.op == Op.DECODE:
            return [self.rows, *self.pages]
        return []

    def with_lists(self, lists: list[tuple[int, ...]]) -> "Command":
        if self.op == Op.PREFILL:
            return dataclasses.replace(self, tokens=lists[0], pages=tuple(lists[1:]))
        if self.op == Op.SCORE:
            return dataclasses.replace(self, tokens=lists[0], targets=lists[1], pages=tuple(lists[2:]))
        if self.op == Op.DECODE:
            return dataclasses.replace(self, rows=lists[0], pages=tuple(lists[1:]))
        return self


def payload_limit(max_seqs: int, max_len: int, page_size: int, prefill_chunk: int) -> int:
    """The longest payload an engine of this shape sends (a decode of every row
    with full page tables, or a score piece with its targets and pages)."""
    pages = -(-max_len // page_size)
    decode = 2 + 2 * max_seqs + max_seqs * pages
    score = 4 + 2 * prefill_chunk + pages
    return max(decode, score)


class Channel:
    """Commands from process 0 to every process, over JAX's own collectives: a fixed-size
    header (op, fields, then a mask of released rows), and a second broadcast of the
    command's integer lists (tokens, targets, rows, page tables), padded to a power of two."""

    def __init__(self, num_rows: int, max_payload: int) -> None:
        self._broadcast = multihost_utils.broadcast_one_to_all
        self.is_source = jax.process_index() == 0
        self.num_rows = num_rows
        self.size = _HEAD + num_rows
        top = _payload_bucket(max_payload)
        self.buckets = [b for b in (1 << k for k in range(6, top.bit_length())) if b <= top]
        self.seq = 0
        self.count = 0  # broadcasts made
        self.seconds = 0.0  # spent in them

    @classmethod
    def for_engine(cls, engine) -> "Channel":
        return cls(engine.max_seqs, payload_limit(engine.max_seqs, engine.max_len, engine.page_size,
                                                  engine.prefill_chunk))

    def _bcast(self, a: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.asarray(self._broadcast(a, is_source=self.is_source))
        self.seconds += time.perf_counter() - t0
        self.count += 1
        return out

    def warmup(self) -> None:
        """Compile every broadcast shape once, in every process: also a barrier before serving."""
        self._bcast(np.zeros(self.size, np.int32))
        for b in self.buckets:
            self._bcast(np.zeros(b, np.int32))
        self.count, self.seconds = 0, 0.0

    def send(self, cmd: Command) -> None:
        if not self.is_source:
            raise RuntimeError("only process 0 sends commands")
        self.seq += 1
        payload = _pack_lists(cmd.lists()) if cmd.lists() else np.zeros(0, np.int32)
        head = np.zeros(self.size, np.int32)
        head[[_OP, _SEQ, _PAYLOAD, _ROW, _START, _LAST, _STEPS]] = [
            cmd.op, self.seq, len(payload), cmd.row, cmd.start, int(cmd.last), cmd.steps,
        ]
        if cmd.params is not None:
            head[_PARAMS:_HEAD] = _pack_params(cmd.params)
        head[[_HEAD + r for r in cmd.released]] = 1
        self._bcast(head)
        if len(payload):
            padded = np.zeros(_payload_bucket(len(payload)), np.int32)
            padded[: len(payload)] = payload
            self._bcast(padded)

    def recv(self) -> Command:
        if self.is_source:
            raise RuntimeError("process 0 sends commands; it does not receive them")
        head = self._bcast(np.zeros(self.size, np.int32))
        self.seq += 1
        if int(head[_SEQ]) != self.seq:
            raise RuntimeError(f"lockstep lost: expected command {self.seq}, got {int(head[_SEQ])}")
        n = int(head[_PAYLOAD])
        payload = self._bcast(np.zeros(_payload_bucket(n), np.int32))[:n] if n else None
        op = Op(int(head[_OP]))
        cmd = Command(
            op=op,
            seq=self.seq,
            row=int(head[_ROW]),
            start=int(head[_START]),
            last=bool(head[_LAST]),
            steps=int(head[_STEPS]),
            params=_unpack_params(head[_PARAMS:_HEAD]) if op == Op.PREFILL else None,
            released=tuple(int(r) for r in np.flatnonzero(head[_HEAD:])),
        )
        return cmd.with_lists(_unpack_lists(payload)) if payload is not None else cmd


# -- process 0 and the others -----------------------------------------------------------------------


class LockstepEngine:
    """:class:`~jaxinfer.engine.types.EngineProtocol` for process 0: each call is broadcast to the
    other processes (which run :func:`follow`) and then made on the local engine. Releases are
    host-only, so they ride along with the next command. An unseeded sampled request gets its
    seed drawn here, so that every process samples the same tokens. Thread-safe: the scheduler
    thread and the keep-alive thread take one lock."""

    def __init__(self, engine, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self.engine = engine
        self.max_seqs = engine.max_seqs
        self.max_len = engine.max_len
        self.page_size = engine.page_size
        self.num_pages = engine.num_pages
        self.prefill_chunk = engine.prefill_chunk
        self.channel = Channel.for_engine(engine)
        self._lock = threading.Lock()
        self._released: list[int] = []
        self._stopped = False
        self._seeds = np.random.default_rng()
        self._last_send = time.monotonic()
        self.channel.warmup()
        self._keepalive_s = keepalive_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="jaxinfer-lockstep-keepalive", daemon=True)
        self._thread.start()

    def _send(self, cmd: Command) -> None:
        if self._stopped:
            raise RuntimeError("the process group was stopped")
        cmd.released, self._released = tuple(self._released), []
        self.channel.send(cmd)
        self._last_send = time.monotonic()

    def prefill(self, row: int, tokens: Sequence[int], params: SamplingParams, *, pages: Sequence[int],
                start: int = 0, last: bool = True) -> SlotToken | None:
        tokens, pages = tuple(int(t) for t in tokens), tuple(int(p) for p in pages)
        if params.seed is None and params.temperature > 0:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(0, 2**63)))
        with self._lock:
            self._send(Command(Op.PREFILL, row=row, start=start, last=last, params=params, tokens=tokens,
                               pages=(pages,)))
            return self.engine.prefill(row, tokens, params, pages=pages, start=start, last=last)

    def decode(self, rows: Sequence[int], pages: Mapping[int, Sequence[int]], steps: int = 1) -> StepHandle:
        rows = tuple(int(r) for r in rows)
        tables = tuple(tuple(int(p) for p in pages[r]) for r in rows)
        with self._lock:
            self._send(Command(Op.DECODE, rows=rows, pages=tables, steps=steps))
            tables = dict(zip(rows, tables))  # steps only when > 1: engines without multi-step take two arguments
            return self.engine.decode(rows, tables, steps) if steps > 1 else self.engine.decode(rows, tables)

    def release(self, row: int) -> None:
        with self._lock:
            self._released.append(int(row))
            self.engine.release(row)

    def score(self, tokens: Sequence[int], targets: Sequence[int], *, pages: Sequence[int],
              start: int = 0) -> ScoreOutput:
        tokens, targets = tuple(map(int, tokens)), tuple(map(int, targets))
        pages = tuple(int(p) for p in pages)
        with self._lock:
            self._send(Command(Op.SCORE, start=start, tokens=tokens, targets=targets, pages=(pages,)))
            return self.engine.score(tokens, targets, pages=pages, start=start)

    def _keepalive(self) -> None:
        while not self._done.wait(min(1.0, self._keepalive_s / 4)):
            if time.monotonic() - self._last_send < self._keepalive_s:
                continue
            with self._lock:
                if not self._stopped and time.monotonic() - self._last_send >= self._keepalive_s:
                    self._send(Command(Op.NOOP))

    def stop(self) -> None:
        """Tell the other processes to exit their :func:`follow` loop (idempotent)."""
        self._done.set()
        with self._lock:
            if not self._stopped:
                self._send(Command(Op.STOP))
                self._stopped = True
        self._thread.join(5.0)
        log.info(
            "lockstep: %d commands in %d broadcasts (%.1fs in them, waits for earlier steps included)",
            self.channel.seq, self.channel.count, self.channel.seconds,
        )


def follow(engine) -> int:
    """The loop of every process but 0: make the engine calls process 0 broadcasts, until STOP.
    Returns 0 on STOP; an engine failure other than a (deterministic) ValueError propagates, so the
    process exits and JAX's coordination service takes the rest of the group down with it."""
    me = jax.process_index()
    channel = Channel.for_engine(engine)
    channel.warmup()

    def on_signal(signum, frame):  # process 0 decides when the group stops (it drains first)
        log.info("process %d: %s ignored: waiting for process 0 to stop the group", me, signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("process %d: following process 0 (serving nothing here)", me)
    try:
        while True:
            cmd = channel.recv()
            for row in cmd.released:
                engine.release(row)
            if cmd.op == Op.STOP:
                log.info("process %d: process 0 stopped the group after %d commands", me, cmd.seq)
                return 0
            try:
                if cmd.op == Op.PREFILL:
                    engine.prefill(cmd.row, cmd.tokens, cmd.params, pages=cmd.pages[0], start=cmd.start,
                                   last=cmd.last)
                elif cmd.op == Op.DECODE:
                    tables = dict(zip(cmd.rows, cmd.pages))
                    engine.decode(cmd.rows, tables, cmd.steps) if cmd.steps > 1 else engine.decode(cmd.rows, tables)
                elif cmd.op == Op.SCORE:
                    engine.score(cmd.tokens, cmd.targets, pages=cmd.pages[0], start=cmd.start)
            except ValueError as e:  # process 0 met the same error in the same call and reported it
                log.info("process %d: command %d (%s) refused as on process 0: %s", me, cmd.seq, cmd.op.name, e)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = [
    "ClusterSpec", "initialize", "mesh_spec", "checkpoint_dir", "shutdown", "add_arguments", "from_args",
    "Op", "Command", "Channel", "LockstepEngine", "follow",
]
