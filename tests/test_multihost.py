"""One model served by two processes, for real: JAX's multi-controller runtime on this machine's
CPU (gloo collectives), two virtual devices per process, ``jaxinfer serve`` in each.

* the channel carries every command exactly, and each process restores only its own shards;
* greedy (and seeded) outputs and scores through process 0's gRPC server equal a single-process
  engine's, on a tiny random model and on SmolLM2; SIGTERM to process 0 stops both cleanly;
* a process killed with SIGKILL takes the other one down within a bounded time, with JAX's
  "another task died" error instead of a hang.

Unit tests of the pieces (flags and environment, parameter packing, the lockstep wrapper behind
the scheduler in one process) come first; they need no second process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from jaxinfer import distributed
from jaxinfer.distributed import ClusterSpec, LockstepEngine, Op, _pack_params, _unpack_params
from jaxinfer.engine.engine import EngineConfig
from jaxinfer.engine.types import SamplingParams
from jaxinfer.loading import build_engine
from jaxinfer.metrics import Metrics
from server import jaxinfer_pb2 as pb
from server import jaxinfer_pb2_grpc as pb_grpc
from server.app import ModelDescription, ServerOptions, build_server
from tests.helpers.fakes import FakeDetokenizer, FakeEngine, FakeTokenizer, expected
from tests.helpers.drive import drive, score_direct

ROOT = Path(__file__).resolve().parents[1]
DIED = re.compile(r"JAX distributed service detected fatal errors|another task died|heartbeat", re.I)


# -- the pieces, in one process ---------------------------------------------------------------------


def test_cluster_spec_flags_then_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert ClusterSpec.resolve(environ={}) is None  # nothing set: one process
    assert ClusterSpec.resolve(num_processes=1, environ={}) is None
    spec = ClusterSpec.resolve(environ=env)
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.is_leader) == ("10.0.0.1:1234", 4, 2, False)
    spec = ClusterSpec.resolve("h:1", 2, 0, environ=env, heartbeat_timeout_s=7)
    assert (spec.coordinator, spec.num_processes, spec.process_id, spec.heartbeat_timeout_s) == ("h:1", 2, 0, 7)
    assert spec.is_leader
    for kwargs, message in [
        (dict(num_processes=2, process_id=0), "needs --coordinator"),
        (dict(coordinator="h:1", num_processes=2), "needs --process-id"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
        (dict(coordinator="h", num_processes=2, process_id=0), "host:port"),
        (dict(process_id=1), "without --num-processes"),
    ]:
        with pytest.raises(ValueError, match=message):
            ClusterSpec.resolve(environ={}, **kwargs)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        ClusterSpec.resolve(environ={"JAX_NUM_PROCESSES": "two"})


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=-0.5,
                   frequency_penalty=0.25, seed=2**63 - 1, logprobs=20),
    SamplingParams(temperature=1e-3, seed=0),
])
def test_sampling_params_survive_the_int32_header(params):
    got = _unpack_params(_pack_params(params))
    want = dataclasses.replace(params, **{f: float(np.float32(getattr(params, f))) for f in
                                          ("temperature", "top_p", "min_p", "repetition_penalty",
                                           "presence_penalty", "frequency_penalty")})
    assert got == want  # floats as the engine uses them (float32), the 64-bit seed exactly


def test_checkpoint_and_mesh_checks(tmp_path):
    with pytest.raises(ValueError, match="needs a converted checkpoint directory.*jaxinfer convert"):
        distributed.checkpoint_dir(str(tmp_path))
    import jax

    n = jax.device_count()
    assert distributed.mesh_spec(None) == f"data=1,model={n}"
    with pytest.raises(ValueError, match="must use every device"):
        distributed.mesh_spec(f"data=1,model={n + 1}")


def test_lockstep_engine_behind_the_scheduler_in_one_process():
    """With one process the broadcast is the identity: the wrapper must still be a faithful
    EngineProtocol (the scheduler's fake engine checks every call), count one command per call,
    carry releases with the next command, and send keep-alives when idle."""
    engine = FakeEngine()
    lock = LockstepEngine(engine, keepalive_s=0.3)
    sent = []
    send = lock.channel.send
    lock.channel.send = lambda cmd: (sent.append(cmd), send(cmd))[1]
    srv = build_server(lock, FakeTokenizer(), ModelDescription("fake"), ServerOptions(), metrics=Metrics(),
                       detokenizer=FakeDetokenizer).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for prompt in ([10, 11, 12], list(range(20, 40))):  # the second needs three prefill chunks
                resps = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=5), timeout=10))
                assert [t for r in resps for t in r.token_ids] == expected(prompt, 5)
        ops = [c.op for c in sent]
        assert ops.count(Op.PREFILL) == 1 + 3 and ops.count(Op.DECODE) >= 8
        n = len(sent)
        time.sleep(1.0)  # idle: keep-alives
        assert sent[-1].op == Op.NOOP and len(sent) > n
        # each request's slot 0 is released with the command after its end, never in a broadcast of its own
        assert [c.released for c in sent if c.released] == [(0,), (0,)]
        assert engine.violations == []
    finally:
        srv.stop()
        lock.stop()
    assert sent[-1].op == Op.STOP
    with pytest.raises(RuntimeError, match="stopped"):
        lock.decode([0], {0: [0]})


# -- two processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's jaxinfer
    env.update(extra)
    return env


def tiny_tokenizer():
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from jaxinfer.tokenizer import HFTokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>", "<|start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["one model served across hosts in lockstep", "the quick brown fox"] * 20, trainer)
    return HFTokenizer(backend, bos_id=1, eos_ids=[0], add_bos=True, chat_template=None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random Llama-shaped checkpoint whose vocabulary is its tokenizer's (8 heads, 4 kv heads:
    both split over 4 devices)."""
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.config import SMOLLM2_135M
    from jaxinfer.model.weights import random_weights

    tok = tiny_tokenizer()
    cfg = dataclasses.replace(
        SMOLLM2_135M, name="tiny-multihost", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=8,
        num_kv_heads=4, head_dim=8, vocab_size=tok.vocab_size, max_position_embeddings=256, bos_token_id=1,
        eos_token_ids=(0,),
    )
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    return save_checkpoint(out, cfg, random_weights(cfg, seed=0, scale=0.15), tok, progress=False)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> Path:
    """One persistent compilation cache for every group of this module: later launches reuse it."""
    return tmp_path_factory.mktemp("xla-cache")


class Group:
    """``jaxinfer serve`` in two processes on this machine. Process 0 gets the group on its flags,
    process 1 through the JAX_* environment variables."""

    def __init__(self, model: Path, workdir: Path, cache: Path, *, mesh: str, max_len: int, heartbeat: int = 10):
        coordinator = f"127.0.0.1:{free_port()}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.logs = [workdir / f"process{i}.log" for i in range(2)]
        base = [sys.executable, "-m", "jaxinfer", "serve", "--model", str(model), "--mesh", mesh, "--port", "0",
                "--http-port", "0",
                "--max-seqs", "2", "--kv-cache-memory", "16MiB", "--max-len", str(max_len), "--grace-period", "5", "--heartbeat-timeout", str(heartbeat)]
        flags = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", "0"]
        envs = [child_env(JAXINFER_XLA_CACHE=str(cache)),
                child_env(JAXINFER_XLA_CACHE=str(cache), JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID="1")]
        self.procs = []
        for i in range(2):
            with open(self.logs[i], "w") as out:
                self.procs.append(subprocess.Popen(base + (flags if i == 0 else []), cwd=ROOT, env=envs[i],
                                                   stdout=out, stderr=subprocess.STDOUT))

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def tail(self, i: int, n: int = 3000) -> str:
        return f"--- process {i} (exit {self.procs[i].poll()}) ---\n" + self.log(i)[-n:]

    def wait_serving(self, timeout: float = 400) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(r"SERVING on 127\.0\.0\.1:(\d+)", self.log(0))
            if m:
                return int(m.group(1))
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        raise AssertionError("process 0 never served\n" + self.tail(0) + "\n" + self.tail(1))

    def wait_exit(self, i: int, timeout: float) -> tuple[int | None, float]:
        t0 = time.monotonic()
        try:
            rc = self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def group_factory(tmp_path, xla_cache):
    groups: list[Group] = []

    def make(model: Path, **kw) -> Group:
        groups.append(Group(model, tmp_path / f"group{len(groups)}", xla_cache, **kw))
        return groups[-1]

    yield make
    for g in groups:
        g.close()


def test_channel_and_shards_across_two_processes(tiny_dir):
    """Every command arrives as sent; each process holds only its own devices' shards."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.multihost_worker", str(i), str(port), str(tiny_dir)],
                              cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (so, se)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{se[-3000:]}"
    res = [json.loads(next(ln for ln in so.splitlines() if ln.startswith("RESULT "))[7:]) for so, _ in outs]
    assert res[1]["received"] == res[0]["sent"]
    assert res[1]["received"][0]["params"]["seed"] == 2**62 + 12345
    for pid, r in enumerate(res):
        assert (r["process"], r["devices"]) == (pid, 4)
        mlp = r["shards"]["layers/w_gate"]  # [layers, embed, mlp]: mlp split over the 4 devices
        assert "'model'" in mlp["spec"]
        assert [s[0] for s in mlp["local"]] == [[2, 64, 32]] * 2 and mlp["global"] == [2, 64, 128]
        for name, w in r["shards"].items():
            assert len(w["local"]) == 2 and all(s[2] == pid for s in w["local"]), name  # only local devices
    ids = {s[1] for r in res for s in r["shards"]["layers/w_gate"]["local"]}
    assert len(ids) == 4  # together the two processes hold all four shards


# -- serving ---------------------------------------------------------------------------------------

TINY_PROMPTS = [[1, 5 + i, 7, 9 + 2 * i, 11] for i in range(4)]


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir):
    """The same checkpoint in this (single) process on one device."""
    eng = build_engine(tiny_dir, EngineConfig(max_seqs=len(TINY_PROMPTS), max_len=64, kv_cache_bytes=1 << 22,
                                              lazy_compile=True))
    greedy = [r["token_ids"] for r in drive(eng, TINY_PROMPTS, max_tokens=12)]
    seeded = drive(eng, TINY_PROMPTS[:1], SamplingParams(temperature=0.8, seed=7), max_tokens=12)[0]["token_ids"]
    tok = eng.tokenizer
    ctx = tok.encode("one model")
    scores = [score_direct(eng, ctx, tok.encode(c, add_bos=False)).logprob for c in (" served", " fox")]
    return {"greedy": greedy, "seeded": seeded, "scores": scores}


def generate(stub, prompt_ids, **kw) -> list[int]:
    resps = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids, ignore_eos=True, **kw), timeout=120))
    return [t for r in resps for t in r.token_ids]


@pytest.mark.slow
def test_two_processes_serve_what_one_does(tiny_dir, tiny_reference, group_factory):
    g = group_factory(tiny_dir, mesh="data=1,model=4", max_len=64)  # tensor parallel across the processes
    port = g.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        with ThreadPoolExecutor(4) as ex:  # 4 requests on 2 slots: queueing, slots reused
            greedy = list(ex.map(lambda p: generate(stub, p, max_tokens=12), TINY_PROMPTS))
        assert greedy == tiny_reference["greedy"]
        assert generate(stub, TINY_PROMPTS[0], max_tokens=12, temperature=0.8, seed=7) == tiny_reference["seeded"]
        scores = stub.Score(pb.ScoreRequest(context="one model", continuations=[" served", " fox"]), timeout=60)
        np.testing.assert_allclose([s.logprob for s in scores.scores], tiny_reference["scores"], atol=1e-4)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert "over 4 cpu device(s) in 2 processes" in info.mesh
    g.procs[0].send_signal(signal.SIGTERM)  # process 0 drains, then stops the group
    for i in range(2):
        rc, _ = g.wait_exit(i, 60)
        assert rc == 0, g.tail(i)
    assert "process 0 stopped the group" in g.log(1)
    assert "following process 0" in g.log(1) and "SERVING" not in g.log(1)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["follower-killed", "leader-killed"])
def test_a_killed_process_ends_the_other(tiny_dir, group_factory, victim):
    """SIGKILL one process in the middle of a request: the other exits non-zero, with JAX's error
    naming a dead task, within the heartbeat timeout (10 s here) plus slack, never hangs."""
    g = group_factory(tiny_dir, mesh="data=1,model=4", max_len=64, heartbeat=10)
    port = g.wait_serving()
    survivor = 1 - victim
    first_token, stream_error = threading.Event(), []

    def long_request():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                for _ in pb_grpc.InferenceStub(ch).Generate(
                    pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=50, ignore_eos=True), timeout=120
                ):
                    first_token.set()
            except grpc.RpcError as e:
                stream_error.append(e.code())
            first_token.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert first_token.wait(60)
    g.procs[victim].kill()
    rc, seconds = g.wait_exit(survivor, 60)
    t.join(30)
    assert rc is not None, f"process {survivor} still running 60 s after process {victim} died\n" + g.tail(survivor)
    assert rc != 0 and seconds < 45, (rc, seconds, g.tail(survivor))
    assert DIED.search(g.log(survivor)), g.tail(survivor)
    print(f"process {survivor} exited {rc} {seconds:.1f}s after process {victim} was killed")


# -- SmolLM2 ------------------------------------------------------------------------------------------

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_two_processes_equal_one(smollm2_dir, group_factory):
    """SmolLM2 on data=2 x model=2: slots split over the two processes, the MLP within each."""
    g = group_factory(smollm2_dir, mesh="data=2,model=2", max_len=128)  # starts while the reference runs
    eng = build_engine(smollm2_dir, EngineConfig(max_seqs=len(SMOL_PROMPTS), max_len=128, kv_cache_bytes=1 << 26,
                                                 lazy_compile=True))
    tok = eng.tokenizer
    want = [r["token_ids"] for r in drive(eng, [tok.encode(p) for p in SMOL_PROMPTS], max_tokens=16)]
    ctx, cont = tok.encode("The capital of France is"), tok.encode(" Paris.", add_bos=False)
    want_score = score_direct(eng, ctx, cont).logprob
    del eng
    port = g.wait_serving(900)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        with ThreadPoolExecutor(2) as ex:
            got = list(ex.map(lambda p: [t for r in stub.Generate(
                pb.GenerateRequest(prompt=p, max_tokens=16, ignore_eos=True), timeout=600) for t in r.token_ids],
                SMOL_PROMPTS))
        score = stub.Score(pb.ScoreRequest(context="The capital of France is", continuations=[" Paris."]), timeout=600)
    assert got == want
    assert abs(score.scores[0].logprob - want_score) < 1e-3
    g.procs[0].send_signal(signal.SIGTERM)
    for i in range(2):
        assert g.wait_exit(i, 120)[0] == 0, g.tail(i)
