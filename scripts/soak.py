#!/usr/bin/env python3
"""A soak of ``jaxinfer serve`` on the real engine: one server process, mixed gRPC and HTTP
clients, faults and page pressure, then the checks that nothing leaked and nothing drifted.

One ``jaxinfer serve`` subprocess (SmolLM2 by default, gRPC and the OpenAI HTTP API both on, a KV
pool smaller than the load needs so that sequences are preempted) gets ``--rounds`` rounds of
``--requests`` requests from ``--concurrency`` client threads: gRPC (``jaxinfer.client``) and
HTTP (``httpx``), streaming and not, greedy and sampled (seeded and not), prompts sharing a few
long prefixes, chat, stop strings, random cancels, gRPC deadlines, mid-stream disconnects, bad
inputs and Score calls (gRPC Score and HTTP echo + logprobs). After every round it waits for the
server to go idle and reads its ``/metrics``; at the end it checks:

* every request ended as its kind allows (no INTERNAL / 500, no hang: every call has a deadline);
* zero sequences and pages held, an empty queue (``/metrics`` gauges), free + cached pages = the pool;
* requests started = the sum of finishes by reason, and the status counters add up: gRPC calls
  counted by code = the calls made, HTTP responses counted by code = the requests sent, refused
  requests counted = the bad inputs that reach validation;
* preemption happened (the pool really was short);
* the server's peak RSS (``VmHWM``) grew at most ``--rss-limit-mib`` between the end of round 1
  (by then the background compile is done) and the end of the last round;
* every greedy request that completed equals the same request served alone afterwards (token ids
  over gRPC, text over HTTP; ``--replay-max`` of them at random, 0: all);
* SIGTERM drains the server and it exits 0.

It prints a table of the counts and the checks, writes ``--json``, and exits 1 if a check failed.

    python scripts/soak.py                                    # SmolLM2, 3 rounds of 100 requests
    python scripts/soak.py --requests 40 --rounds 2 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxinfer.client import InferenceClient, generate_request  # noqa: E402

KINDS = {  # kind: weight in the mix
    "greedy": 30, "sampled": 12, "cancel": 8, "deadline": 8, "disconnect": 8, "bad": 12, "score": 8, "chat": 6,
    "stop": 8,
}
# what each kind may end as, seen by the client ("ok": finished with stop / length)
ALLOWED = {
    "greedy": {"ok"}, "sampled": {"ok"}, "chat": {"ok"}, "stop": {"ok"}, "score": {"ok"},
    "cancel": {"ok", "cancelled"}, "deadline": {"ok", "DEADLINE_EXCEEDED"}, "disconnect": {"ok", "disconnected"},
    "bad": {"INVALID_ARGUMENT", "400"},
}
PREFIXES = [
    "You are a careful assistant who answers questions about geography, history and science. Keep every "
    "answer short and factual, name your sources when you can, and say so plainly when you do not know. ",
    "The following is a transcript of a lecture on the history of computing, from the mechanical "
    "calculators of the seventeenth century through the first stored-program machines to the "
    "microprocessor. The lecturer speaks slowly and repeats the key dates. ",
    "Recipe notes, kept by a cook in a small restaurant by the harbour: bread, soups, fish and the "
    "desserts the regulars ask for every week, with the quantities for a dinner service of forty. ",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out\n\n",
]
TOPICS = ["the river Nile", "the printing press", "a lemon tart", "prime numbers", "the moon landing", "volcanoes",
          "the Roman roads", "sourdough", "binary search", "the tides", "glaciers", "the telegraph"]
CHAT_QUESTIONS = ["What is the capital of France?", "Name three colours.", "How many legs does a spider have?",
                  "Write a haiku about rain.", "What is 12 times 12?"]


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    requests: int = 100  # per round
    rounds: int = 3
    concurrency: int = 12
    seed: int = 0
    max_tokens: int = 48
    max_seqs: int = 8
    max_len: int = 384
    page_size: int = 16
    kv_cache_memory: str = "16MiB"
    prefill_buckets: str = "32,128"
    rss_limit_mib: float = 64.0
    replay_max: int = 32  # greedy requests replayed alone, a random sample (0: all; each takes a while on a CPU)
    startup_timeout: float = 900.0
    request_timeout: float = 300.0
    grace_period: float = 60.0
    progress: bool = True
    log_path: str = ""


@dataclass
class Outcome:
    index: int
    kind: str
    front: str  # grpc / http
    stream: bool
    status: str = "NO_RESULT"  # ok, cancelled, disconnected, a gRPC code name, an HTTP code
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    seconds: float = 0.0
    detail: str = ""
    greedy: bool = False
    spec: dict = field(default_factory=dict)  # what to send again to replay it


# -- the server -------------------------------------------------------------------------------------


class ServerProcess:
    """``jaxinfer serve`` as a subprocess of this worktree, its log in a file."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.log_path = Path(cfg.log_path or tempfile.mkstemp(prefix="soak-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "jaxinfer", "serve", "--model", cfg.model, "--port", "0", "--http-port", "0",
               "--max-seqs", str(cfg.max_seqs), "--max-len", str(cfg.max_len), "--page-size", str(cfg.page_size),
               "--kv-cache-memory", cfg.kv_cache_memory, "--prefill-buckets", cfg.prefill_buckets,
               "--grace-period", str(cfg.grace_period)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        grpc_line = self.wait_for_log(r"SERVING on (\S+)", cfg.startup_timeout)
        http_line = self.wait_for_log(r"OpenAI-compatible API on (\S+)/v1", 30)
        self.grpc_address, self.http_url = grpc_line.group(1), http_line.group(1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.log_text())
            if m:
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"jaxinfer serve exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"no {pattern!r} in the server log within {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in bytes."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(self.http_url + "/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then the exit code (None: it did not exit within ``timeout``; it is killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._log.close()


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_sum(m: dict, name: str, **labels) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


# -- the requests -----------------------------------------------------------------------------------


def _prompt(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    question = rng.choice([f"Tell me about {topic}.", f"Write two sentences about {topic}.",
                           f"Question {rng.randrange(1000)}: what do you know about {topic}?"])
    return (rng.choice(PREFIXES) if rng.random() < 0.8 else "") + question


def plan(cfg: Config, rng: random.Random, start: int, vocab_size: int) -> list[dict]:
    """One round's requests: kind, front end, streaming, fields; random, reproducible from the seed."""
    kinds = list(KINDS)
    weights = [KINDS[k] for k in kinds]
    out = []
    burst = min(cfg.max_seqs, cfg.concurrency, cfg.requests)
    for i in range(start, start + cfg.requests):
        # each round opens with a burst of long greedy requests, together more than the pool holds
        kind = "greedy" if i - start < burst else rng.choices(kinds, weights)[0]
        front = "grpc" if kind == "deadline" else rng.choice(["grpc", "http"])
        stream = True if kind in ("cancel", "disconnect") else rng.random() < 0.5
        p = {"index": i, "kind": kind, "front": front, "stream": stream, "prompt": _prompt(rng),
             "max_tokens": rng.randrange(4, cfg.max_tokens + 1), "temperature": 0.0, "after": rng.randrange(1, 6)}
        if kind == "greedy" and (i - start < burst or rng.random() < 0.3):  # to max_tokens: they press on the pool
            p.update(ignore_eos=True, max_tokens=cfg.max_tokens)
        if kind == "sampled":
            p.update(temperature=rng.choice([0.7, 1.0]), top_p=0.95)
            if rng.random() < 0.5:
                p["seed"] = rng.randrange(2**31)
        elif kind in ("cancel", "deadline", "disconnect"):
            p["temperature"] = rng.choice([0.0, 0.8])
            p["deadline"] = rng.uniform(0.3, 4.0)
        elif kind == "stop":
            p["stop"] = [rng.choice([".", "\n", ","])]
        elif kind == "chat":
            p["front"], p["messages"] = "http", [{"role": "user", "content": rng.choice(CHAT_QUESTIONS)}]
        elif kind == "score":
            p["continuations"] = [" " + rng.choice(TOPICS) for _ in range(rng.randrange(1, 4))]
        elif kind == "bad":
            p["bad"] = rng.choice(BAD_GRPC if front == "grpc" else BAD_HTTP)
        out.append(p)
    return out


# name: fields that make the request invalid; every one reaches validation (counted as rejected)
# except the HTTP schema's own refusals (marked False)
BAD_GRPC = ["temperature -1", "top_p 0", "max_tokens 0", "prompt over the context", "token id out of the vocabulary",
            "empty prompt", "too many stop strings"]
BAD_HTTP = BAD_GRPC + ["unknown field", "invalid JSON", "n too large", "max_tokens negative"]
BAD_COUNTED = {name: True for name in BAD_HTTP} | {"unknown field": False, "invalid JSON": False}


def _bad_fields(name: str, p: dict, vocab_size: int, max_len: int) -> dict:
    return {
        "temperature -1": {"temperature": -1.0}, "top_p 0": {"top_p": 0.0}, "max_tokens 0": {"max_tokens": 0},
        "max_tokens negative": {"max_tokens": -3}, "prompt over the context": {"prompt_ids": [100] * (max_len + 8)},
        "token id out of the vocabulary": {"prompt_ids": [5, vocab_size + 7]}, "empty prompt": {"prompt": ""},
        "too many stop strings": {"stop": [f"s{i}" for i in range(17)]}, "unknown field": {"extra": {"frobnicate": 1}},
        "invalid JSON": {"raw": b'{"prompt": "hi", '}, "n too large": {"extra": {"n": 1000}},
    }[name]


class Clients:
    """The client side: one gRPC channel shared by every thread (plus a private one per disconnect),
    one httpx client per thread."""

    def __init__(self, server: ServerProcess, cfg: Config, vocab_size: int, max_len: int, model: str) -> None:
        self.server, self.cfg, self.vocab_size, self.max_len, self.model = server, cfg, vocab_size, max_len, model
        self.grpc = InferenceClient(server.grpc_address, timeout=cfg.request_timeout)
        self._local = threading.local()

    def http(self) -> httpx.Client:
        if not hasattr(self._local, "http"):
            self._local.http = httpx.Client(base_url=self.server.http_url, timeout=self.cfg.request_timeout)
        return self._local.http

    def close(self) -> None:
        self.grpc.close()

    def run(self, p: dict) -> Outcome:
        o = Outcome(p["index"], p["kind"], p["front"], p["stream"], spec=p)
        o.greedy = p["kind"] not in ("bad", "score") and p["temperature"] == 0.0
        t0 = time.monotonic()
        try:
            if p["kind"] == "score":
                self._score(p, o)
            elif p["front"] == "grpc":
                self._grpc(p, o)
            else:
                self._http(p, o)
        except Exception as e:  # a client-side failure is an outcome to report, not a crash
            o.status, o.detail = "client-error", f"{type(e).__name__}: {e}"[:300]
        o.seconds = time.monotonic() - t0
        return o

    # gRPC

    def _grpc_request(self, p: dict):
        fields = dict(max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p.get("top_p"),
                      seed=p.get("seed"), stop=p.get("stop", []), ignore_eos=p.get("ignore_eos", False),
                      request_id=f"soak-{p['index']}")
        ids = None
        if p["kind"] == "bad":
            bad = _bad_fields(p["bad"], p, self.vocab_size, self.max_len)
            ids = bad.pop("prompt_ids", None)
            fields.update(bad)
        if ids is not None:
            return generate_request(prompt_token_ids=ids, **fields)
        return generate_request(fields.pop("prompt", p["prompt"]), **fields)

    def _grpc(self, p: dict, o: Outcome) -> None:
        kind = p["kind"]
        own = InferenceClient(self.server.grpc_address) if kind == "disconnect" else None
        client = own or self.grpc
        timeout = p["deadline"] if kind == "deadline" else self.cfg.request_timeout
        call = client.generate(self._grpc_request(p), timeout=timeout)
        try:
            for n, resp in enumerate(call, 1):
                o.token_ids.extend(resp.token_ids)
                o.text += resp.text
                if resp.finish_reason:
                    o.status, o.finish_reason = "ok", resp.finish_reason
                elif n == p["after"] and kind == "cancel":
                    call.cancel()
                elif n == p["after"] and kind == "disconnect":
                    own.close()
                    o.status = "disconnected"
                    return
        except grpc.RpcError as e:
            code = e.code()
            o.status = "cancelled" if code == grpc.StatusCode.CANCELLED and kind == "cancel" else code.name
            o.detail = (e.details() or "")[:300]
        except ValueError:  # iterating a call whose channel was closed
            o.status = "disconnected"
        finally:
            if own is not None:
                own.close()

    def _score(self, p: dict, o: Outcome) -> None:
        if p["front"] == "grpc":
            try:
                resp = self.grpc.score(p["prompt"], p["continuations"])
                o.status, o.detail = "ok", " ".join(f"{s.logprob:.3f}" for s in resp.scores)
            except grpc.RpcError as e:
                o.status, o.detail = e.code().name, (e.details() or "")[:300]
            return
        r = self.http().post("/v1/completions", json={"model": self.model, "prompt": p["prompt"], "echo": True,
                                                      "logprobs": 1, "max_tokens": 0})
        o.status = "ok" if r.status_code == 200 else str(r.status_code)
        o.detail = r.text[:300] if r.status_code != 200 else f"{len(r.json()['choices'][0]['logprobs']['tokens'])} tokens"

    # HTTP

    def _http_body(self, p: dict) -> tuple[str, dict | bytes]:
        chat = "messages" in p
        body: dict = {"model": self.model, "max_tokens": p["max_tokens"], "temperature": p["temperature"],
                      "stream": p["stream"]}
        body.update({"messages": p["messages"]} if chat else {"prompt": p["prompt"]})
        for key in ("top_p", "seed", "stop", "ignore_eos"):
            if key in p:
                body[key] = p[key]
        if p["kind"] == "bad":
            bad = _bad_fields(p["bad"], p, self.vocab_size, self.max_len)
            if "raw" in bad:
                return "/v1/completions", bad["raw"]
            if "prompt_ids" in bad:
                body["prompt"] = bad.pop("prompt_ids")
            body.update(bad.pop("extra", {}))
            body.update(bad)
        return ("/v1/chat/completions" if chat else "/v1/completions"), body

    def _http(self, p: dict, o: Outcome) -> None:
        path, body = self._http_body(p)
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        if not p["stream"]:
            r = self.http().post(path, **kw)
            if r.status_code != 200:
                o.status, o.detail = str(r.status_code), r.text[:300]
                return
            choice = r.json()["choices"][0]
            o.text = choice["message"]["content"] if "message" in choice else choice["text"]
            o.status, o.finish_reason = "ok", choice["finish_reason"]
            return
        with self.http().stream("POST", path, **kw) as r:
            if r.status_code != 200:
                r.read()
                o.status, o.detail = str(r.status_code), r.text[:300]
                return
            chunks = 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:  # a request that failed mid-stream
                    o.status, o.detail = str(obj["error"].get("code")), obj["error"].get("message", "")[:300]
                    return
                for c in obj.get("choices", ()):
                    o.text += c["delta"].get("content") or "" if "delta" in c else c.get("text") or ""
                    if c.get("finish_reason"):
                        o.status, o.finish_reason = "ok", c["finish_reason"]
                chunks += 1
                if p["kind"] in ("cancel", "disconnect") and chunks == p["after"] and not o.finish_reason:
                    o.status = "cancelled" if p["kind"] == "cancel" else "disconnected"
                    return  # leaving the block closes the connection mid-stream
            if o.status == "NO_RESULT":
                o.status, o.detail = "truncated", "the stream ended without a finish_reason or an error"


# -- the soak ---------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def wait_idle(server: ServerProcess, timeout: float = 60.0) -> dict:
    """/metrics once nothing is running or queued (the last read when ``timeout`` passes)."""
    end = time.monotonic() + timeout
    while True:
        m = server.metrics()
        busy = (metric(m, "jaxinfer_active_seqs") or metric(m, "jaxinfer_queue_requests")
                or metric(m, "jaxinfer_kv_pages", state="used")
                or metric(m, "jaxinfer_requests_started_total") != metric_sum(m, "jaxinfer_requests_finished_total"))
        if not busy or time.monotonic() > end:
            return m
        time.sleep(0.2)


def run_round(clients: Clients, plans: list[dict], cfg: Config, label: str) -> list[Outcome]:
    bar = None
    if cfg.progress:
        bar = tqdm(total=len(plans), desc=label, unit="req", file=sys.stderr)
    outcomes = []
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for o in pool.map(clients.run, plans):
            outcomes.append(o)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return outcomes


def replay(clients: Clients, outcomes: list[Outcome], cfg: Config, rng: random.Random) -> tuple[int, list[dict]]:
    """Serve each completed greedy request again, alone; the ones whose output differs."""
    todo = [o for o in outcomes if o.greedy and o.status == "ok"]
    if cfg.replay_max and len(todo) > cfg.replay_max:
        todo = sorted(rng.sample(todo, cfg.replay_max), key=lambda o: o.index)
    differ = []
    bar = None
    if cfg.progress:
        bar = tqdm(total=len(todo), desc="replay alone", unit="req", file=sys.stderr)
    for o in todo:
        again = clients.run({**o.spec, "kind": "greedy", "index": o.index})
        same = again.status == "ok" and again.text == o.text and again.finish_reason == o.finish_reason
        if o.front == "grpc":
            same = same and again.token_ids == o.token_ids
        if not same:
            differ.append({"index": o.index, "kind": o.kind, "front": o.front, "soak": o.text[:200],
                           "alone": again.text[:200], "soak_ids": o.token_ids[:64], "alone_ids": again.token_ids[:64],
                           "status": again.status})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return len(todo), differ


def checks_of(cfg: Config, outcomes: list[Outcome], base: dict, rounds_end: dict, end: dict, info, rss: list[dict],
              replayed: int, differ: list[dict], exit_code: int | None, drain_s: float) -> list[Check]:
    """The checks: counters over the rounds (``base`` to ``rounds_end``, before the replay), what is
    held at the ``end`` (after the replay)."""
    d = lambda name, **lab: metric(rounds_end, name, **lab) - metric(base, name, **lab)  # noqa: E731
    ds = lambda name, **lab: metric_sum(rounds_end, name, **lab) - metric_sum(base, name, **lab)  # noqa: E731
    out = []
    bad = [o for o in outcomes if o.status not in ALLOWED[o.kind]]
    out.append(Check("every request ended as its kind allows", not bad,
                     f"{len(bad)} unexpected: " + "; ".join(f"#{o.index} {o.kind}/{o.front}: {o.status} {o.detail[:120]}"
                                                            for o in bad[:5]) if bad else f"{len(outcomes)} requests"))
    held = {"active_seqs": metric(end, "jaxinfer_active_seqs"), "pages_used": metric(end, "jaxinfer_kv_pages", state="used"),
            "queue_requests": metric(end, "jaxinfer_queue_requests"), "queue_tokens": metric(end, "jaxinfer_queue_tokens")}
    out.append(Check("zero sequences and pages held, empty queue", not any(held.values()),
                     ", ".join(f"{k}={v:g}" for k, v in held.items())))
    pages = metric(end, "jaxinfer_kv_pages", state="free") + metric(end, "jaxinfer_kv_pages", state="cached")
    out.append(Check("free + cached pages = the pool", pages == info.num_pages, f"{pages:g} of {info.num_pages}"))
    total_started, total_finished = (metric(end, "jaxinfer_requests_started_total"),
                                     metric_sum(end, "jaxinfer_requests_finished_total"))
    out.append(Check("started = sum of finishes (since start-up, replay included)", total_started == total_finished,
                     f"started {total_started:g}, finished {total_finished:g}"))
    started, finished = d("jaxinfer_requests_started_total"), ds("jaxinfer_requests_finished_total")
    by_reason = {r: d("jaxinfer_requests_finished_total", reason=r) for r in ("stop", "length", "cancelled", "deadline", "error")}
    out.append(Check("started = sum of finishes by reason (the rounds)", started == finished,
                     f"started {started:g}, finished {finished:g} " + str({k: int(v) for k, v in by_reason.items()})))
    out.append(Check("no request finished in error", by_reason["error"] == 0, f"error {by_reason['error']:g}"))

    generating = [o for o in outcomes if o.kind not in ("bad", "score")]
    ended_by_client = sum(o.status in ("cancelled", "DEADLINE_EXCEEDED", "disconnected") for o in generating)
    done = sum(o.status == "ok" for o in generating)
    out.append(Check("started = generation requests sent (less bad inputs)", started == len(generating),
                     f"started {started:g}, sent {len(generating)}"))
    out.append(Check("stop + length >= completed, cancelled + deadline <= ended by the client",
                     by_reason["stop"] + by_reason["length"] >= done
                     and by_reason["cancelled"] + by_reason["deadline"] <= ended_by_client,
                     f"stop+length {by_reason['stop'] + by_reason['length']:g} >= {done}, cancelled+deadline "
                     f"{by_reason['cancelled'] + by_reason['deadline']:g} <= {ended_by_client}"))
    grpc_gen = sum(o.front == "grpc" and o.kind != "score" for o in outcomes)
    grpc_score = sum(o.front == "grpc" and o.kind == "score" for o in outcomes)
    counted_gen, counted_score = ds("jaxinfer_grpc_requests_total", method="Generate"), ds("jaxinfer_grpc_requests_total", method="Score")
    out.append(Check("gRPC calls counted by code = calls made", counted_gen == grpc_gen and counted_score == grpc_score,
                     f"Generate {counted_gen:g}/{grpc_gen}, Score {counted_score:g}/{grpc_score}"))
    http_sent = Counter("/v1/chat/completions" if "messages" in o.spec else "/v1/completions"
                        for o in outcomes if o.front == "http")
    http_counted = {r: ds("jaxinfer_http_requests_total", route=r) for r in http_sent}
    out.append(Check("HTTP responses counted by code = requests sent", all(http_counted[r] == n for r, n in http_sent.items()),
                     ", ".join(f"{r} {http_counted[r]:g}/{n}" for r, n in http_sent.items())))
    internal = ds("jaxinfer_grpc_requests_total", code="INTERNAL") + ds("jaxinfer_http_requests_total", code="500")
    out.append(Check("no INTERNAL / 500 counted", internal == 0, f"server counted {internal:g}"))
    bad_counted = sum(o.kind == "bad" and BAD_COUNTED[o.spec["bad"]] for o in outcomes)
    rejected = d("jaxinfer_requests_rejected_total", cause="invalid")
    out.append(Check("refused requests counted = bad inputs that reach validation", rejected == bad_counted,
                     f"rejected(invalid) {rejected:g}, bad inputs {bad_counted}"))
    pre = d("jaxinfer_preemptions_total")
    out.append(Check("preemption happened (pool smaller than the demand)", pre > 0, f"{pre:g} preemptions"))
    if len(rss) >= 2:
        grow = (rss[-1]["VmHWM"] - rss[0]["VmHWM"]) / 2**20
        cur = (rss[-1]["VmRSS"] - rss[0]["VmRSS"]) / 2**20
        out.append(Check(f"peak RSS growth round 1 -> {len(rss)} <= {cfg.rss_limit_mib:g} MiB", grow <= cfg.rss_limit_mib,
                         f"VmHWM +{grow:.1f} MiB, VmRSS {cur:+.1f} MiB"))
    out.append(Check("greedy requests equal the same request served alone", not differ and replayed > 0,
                     f"{replayed - len(differ)}/{replayed} equal" + (f"; first differs: {differ[0]}"[:400] if differ else "")))
    out.append(Check("SIGTERM drains and exits 0", exit_code == 0, f"exit {exit_code} after {drain_s:.1f}s"))
    return out


def soak(cfg: Config) -> dict:
    """Run the whole soak; returns the report (``report["ok"]``: every check passed)."""
    rng = random.Random(cfg.seed)
    t_start = time.monotonic()
    server = ServerProcess(cfg)
    startup_s = time.monotonic() - t_start
    outcomes: list[Outcome] = []
    rounds: list[dict] = []
    rss: list[dict] = []
    exit_code, drain_s = None, 0.0
    try:
        clients = None
        with InferenceClient(server.grpc_address) as probe:
            info = probe.model_info()
        clients = Clients(server, cfg, info.vocab_size, info.max_len, info.model)
        base = server.metrics()
        for r in range(cfg.rounds):
            plans = plan(cfg, rng, r * cfg.requests, info.vocab_size)
            t0 = time.monotonic()
            got = run_round(clients, plans, cfg, f"round {r + 1}/{cfg.rounds}")
            seconds = time.monotonic() - t0
            pending = re.search(r"(\d+) more compile in the background", server.log_text())
            if r == 0 and pending and int(pending.group(1)) > 0:
                try:  # the rounds after the first measure a server that compiles nothing more
                    server.wait_for_log(r"background compile done", cfg.startup_timeout)
                except TimeoutError:
                    pass
            m = wait_idle(server)
            mem = server.memory()
            rss.append(mem)
            outcomes += got
            rounds.append({"round": r + 1, "seconds": round(seconds, 1), "requests": len(got),
                           "statuses": dict(Counter(o.status for o in got)), "VmRSS": mem["VmRSS"], "VmHWM": mem["VmHWM"],
                           "preemptions": metric(m, "jaxinfer_preemptions_total"),
                           "tokens": metric(m, "jaxinfer_generation_tokens_total")})
        rounds_end = wait_idle(server)
        t0 = time.monotonic()
        replayed, differ = replay(clients, outcomes, cfg, rng)
        replay_s = time.monotonic() - t0
        end = wait_idle(server)
        clients.close()
        t0 = time.monotonic()
        exit_code = server.stop(cfg.grace_period + 60)
        drain_s = time.monotonic() - t0
    finally:
        if server.proc.poll() is None:
            server.stop(30)
    checks = checks_of(cfg, outcomes, base, rounds_end, end, info, rss, replayed, differ, exit_code, drain_s)
    log = server.log_text()
    return {
        "ok": all(c.ok for c in checks),
        "config": asdict(cfg),
        "model": info.model,
        "pool": {"num_pages": info.num_pages, "page_size": info.page_size, "tokens": info.num_pages * info.page_size,
                 "max_seqs": info.slots, "max_len": info.max_len},
        "startup_s": round(startup_s, 1),
        "total_s": round(time.monotonic() - t_start, 1),
        "rounds": rounds,
        "counts": {f"{k}/{f}/{s}": n for (k, f, s), n in sorted(Counter((o.kind, o.front, o.status) for o in outcomes).items())},
        "finished_by_reason": {r: metric(rounds_end, "jaxinfer_requests_finished_total", reason=r) - metric(base, "jaxinfer_requests_finished_total", reason=r)
                               for r in ("stop", "length", "cancelled", "deadline", "error")},
        "preemptions": metric(rounds_end, "jaxinfer_preemptions_total") - metric(base, "jaxinfer_preemptions_total"),
        "prefix_cache_hit_rate": metric(end, "jaxinfer_prefix_cache_hit_rate"),
        "generated_tokens": metric(rounds_end, "jaxinfer_generation_tokens_total") - metric(base, "jaxinfer_generation_tokens_total"),
        "replayed": replayed,
        "replay_s": round(replay_s, 1),
        "differ": differ,
        "checks": [asdict(c) for c in checks],
        "server_log": str(server.log_path),
        "server_log_errors": sum(1 for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line),
    }


def print_report(report: dict) -> None:
    console = Console()
    counts = Table(title=f"soak: {report['model']}, pool {report['pool']['num_pages']} pages x "
                         f"{report['pool']['page_size']} tokens, {report['pool']['max_seqs']} rows")
    for col in ("kind", "front", "outcome", "n"):
        counts.add_column(col, justify="right" if col == "n" else "left")
    for key, n in report["counts"].items():
        counts.add_row(*key.split("/", 2), str(n))
    console.print(counts)
    rounds = Table(title="rounds")
    for col in ("round", "seconds", "requests", "tokens (total)", "preemptions (total)", "VmRSS MiB", "VmHWM MiB"):
        rounds.add_column(col, justify="right")
    for r in report["rounds"]:
        rounds.add_row(str(r["round"]), f"{r['seconds']:.1f}", str(r["requests"]), f"{r['tokens']:g}",
                       f"{r['preemptions']:g}", f"{r['VmRSS'] / 2**20:.1f}", f"{r['VmHWM'] / 2**20:.1f}")
    console.print(rounds)
    console.print("finished by reason: " + ", ".join(f"{k} {v:g}" for k, v in report["finished_by_reason"].items())
                  + f"; preemptions {report['preemptions']:g}; prefix-cache hit rate {report['prefix_cache_hit_rate']:.2f}"
                  + f"; start-up {report['startup_s']}s, total {report['total_s']}s")
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    checks.add_column("detail")
    for c in report["checks"]:
        checks.add_row(c["name"], "[green]PASS[/]" if c["ok"] else "[red]FAIL[/]", c["detail"])
    console.print(checks)
    console.print(f"server log: {report['server_log']} ({report['server_log_errors']} ERROR/CRITICAL lines)")


def parse_args(argv: list[str] | None = None) -> tuple[Config, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--model", default=d.model)
    p.add_argument("--requests", type=int, default=d.requests, help="requests per round")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="client threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens of a request")
    p.add_argument("--max-seqs", type=int, default=d.max_seqs)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--kv-cache-memory", default=d.kv_cache_memory,
                   help="the server's KV pool: smaller than concurrency x (prompt + max_tokens), so it preempts")
    p.add_argument("--prefill-buckets", default=d.prefill_buckets)
    p.add_argument("--rss-limit-mib", type=float, default=d.rss_limit_mib)
    p.add_argument("--replay-max", type=int, default=d.replay_max, help="greedy requests replayed alone (0: all)")
    p.add_argument("--log", default="", help="server log file (default: a temporary file)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    cfg = Config(model=a.model, requests=a.requests, rounds=a.rounds, concurrency=a.concurrency, seed=a.seed,
                 max_tokens=a.max_tokens, max_seqs=a.max_seqs, max_len=a.max_len, page_size=a.page_size,
                 kv_cache_memory=a.kv_cache_memory, prefill_buckets=a.prefill_buckets, rss_limit_mib=a.rss_limit_mib,
                 replay_max=a.replay_max, progress=not a.no_progress, log_path=a.log)
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    cfg, json_path = parse_args(argv)
    report = soak(cfg)
    print_report(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
