"""Serving benchmark: drive a running ``jaxinfer serve`` over gRPC and measure what clients see.

Load: a fixed number of requests in flight (``concurrency``), or arrivals at ``rate`` requests/s
with gamma-distributed gaps (``burstiness`` = the gamma shape: 1 is a Poisson process, < 1
burstier, > 1 more regular; the mean gap is always 1 / rate), optionally capped at
``max_concurrency`` in flight. Requests: prompts of random token ids with lengths drawn
uniformly from ``[len * (1 - range_ratio), len * (1 + range_ratio)]`` and exactly that many
output tokens (``ignore_eos``), or prompts and output lengths from a JSONL file.

Per request, timed at the client: TTFT (send -> first streamed token), inter-token latencies
(gaps between successive streamed responses), TPOT ((end-to-end - TTFT) / (output tokens - 1))
and end-to-end latency. Per run: request and token throughput, those latencies at
p50/p90/p95/p99, and goodput: completed requests per second that met every given SLO.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.client import InferenceClient, generate_request
from jaxinfer.evaluation.results import format_table

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class BenchRequest:
    max_tokens: int
    prompt_ids: tuple[int, ...] = ()
    prompt: str = ""


@dataclass
class RequestRecord:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = math.nan  # seconds
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)  # seconds between successive token-bearing responses

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else math.nan


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        """Completed within every given limit (TPOT is not checked for one-token outputs)."""
        if not r.ok:
            return False
        if self.ttft_ms is not None and not r.ttft * 1e3 <= self.ttft_ms:
            return False
        if self.tpot_ms is not None and r.output_tokens > 1 and not r.tpot * 1e3 <= self.tpot_ms:
            return False
        return self.e2e_ms is None or r.e2e * 1e3 <= self.e2e_ms

    def given(self) -> bool:
        return any(x is not None for x in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


# --- requests ---------------------------------------------------------------------------------------


def synthetic_requests(n: int, input_len: int, output_len: int, *, vocab_size: int, range_ratio: float = 0.0,
                       exclude_ids: Sequence[int] = (), seed: int = 0) -> list[BenchRequest]:
    """``n`` prompts of random token ids (never ``exclude_ids``, e.g. EOS) and output lengths."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio={range_ratio} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    excluded = np.array(sorted(set(int(i) for i in exclude_ids)), np.int64)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, n)

    ins, outs = lengths(input_len), lengths(output_len)
    reqs = []
    for i in range(n):
        ids = rng.integers(0, vocab_size - len(excluded), ins[i])
        for e in excluded:  # map onto the vocabulary without the excluded ids
            ids = ids + (ids >= e)
        reqs.append(BenchRequest(int(outs[i]), tuple(int(t) for t in ids)))
    return reqs


def dataset_requests(path: str | Path, n: int | None, default_output_len: int, seed: int = 0) -> list[BenchRequest]:
    """JSONL lines ``{"prompt": str | "prompt_token_ids": [int], "output_len" | "max_tokens": int}``;
    ``n`` of them drawn without replacement (all, in order, when ``n`` is None)."""
    rows = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        out = int(obj.get("output_len", obj.get("max_tokens", default_output_len)))
        if "prompt_token_ids" in obj:
            rows.append(BenchRequest(out, tuple(int(t) for t in obj["prompt_token_ids"])))
        elif "prompt" in obj:
            rows.append(BenchRequest(out, prompt=str(obj["prompt"])))
        else:
            raise ValueError(f"{path}:{k}: needs \"prompt\" or \"prompt_token_ids\"")
    if n is not None:
        if n > len(rows):
            rows = rows * math.ceil(n / len(rows))
        rows = random.Random(seed).sample(rows, n)
    return rows


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests at ``rate``/s; all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate={rate} and burstiness={burstiness} must be > 0")
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
    gaps[0] = 0.0
    return [float(x) for x in np.cumsum(gaps)]


# --- running ----------------------------------------------------------------------------------------


def send(client: InferenceClient, req: BenchRequest) -> RequestRecord:
    """Stream one Generate call (greedy, to its full length) and time it at the client."""
    msg = generate_request(req.prompt, prompt_token_ids=req.prompt_ids, max_tokens=req.max_tokens, ignore_eos=True,
                           temperature=0.0)
    rec = RequestRecord()
    t0 = time.perf_counter()
    last = None
    try:
        for resp in client.generate(msg):
            now = time.perf_counter()
            if resp.token_ids:
                if last is None:
                    rec.ttft = now - t0
                else:
                    rec.itl.append(now - last)
                last = now
                rec.output_tokens += len(resp.token_ids)
            if resp.finish_reason:
                rec.prompt_tokens = resp.usage.prompt_tokens
        rec.e2e = time.perf_counter() - t0
        rec.ok = rec.output_tokens > 0
    except grpc.RpcError as e:
        rec.error = f"{e.code().name}: {e.details()}"
    return rec


@dataclass
class RunResult:
    label: str
    concurrency: int | None
    rate: float
    burstiness: float
    duration_s: float
    records: list[RequestRecord]

    def metrics(self, slo: SLO = SLO()) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        d = self.duration_s or math.nan
        out_tok = sum(r.output_tokens for r in ok)
        in_tok = sum(r.prompt_tokens for r in ok)
        m: dict[str, Any] = {
            "label": self.label,
            "concurrency": self.concurrency,
            "request_rate": None if math.isinf(self.rate) else self.rate,
            "burstiness": self.burstiness,
            "completed": len(ok),
            "failed": len(self.records) - len(ok),
            "errors": sorted({r.error for r in self.records if r.error})[:5],
            "duration_s": self.duration_s,
            "request_throughput": len(ok) / d,
            "input_tokens_per_s": in_tok / d,
            "output_tokens_per_s": out_tok / d,
            "total_tokens_per_s": (in_tok + out_tok) / d,
            "input_tokens": in_tok,
            "output_tokens": out_tok,
        }
        for name, values in (("ttft_ms", [r.ttft for r in ok]), ("tpot_ms", [r.tpot for r in ok]),
                             ("itl_ms", [x for r in ok for x in r.itl]), ("e2e_ms", [r.e2e for r in ok])):
            m[name] = latency_stats(values)
        if slo.given():
            good = sum(slo.met(r) for r in ok)
            m["slo"] = {k: v for k, v in asdict(slo).items() if v is not None}
            m["goodput"] = good / d
            m["slo_attainment"] = good / len(self.records) if self.records else math.nan
        return m


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """mean and percentiles in milliseconds (NaN-free input; NaNs dropped)."""
    a = np.array([x for x in seconds if not math.isnan(x)], np.float64) * 1e3
    if a.size == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}, "n": 0}
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}, "n": int(a.size)}


def run_load(send_one: Callable[[BenchRequest], RequestRecord], requests: Sequence[BenchRequest], *,
             concurrency: int | None = None, rate: float = math.inf, burstiness: float = 1.0, seed: int = 0,
             label: str = "", progress: bool = False) -> RunResult:
    """Send ``requests`` at ``rate`` (inf: all at once) with at most ``concurrency`` in flight.
    ``send_one`` streams one request over whichever protocol: ``functools.partial(send, client)`` for
    gRPC, ``OpenAIClient.send`` for an OpenAI-compatible server."""
    if concurrency is None and math.isinf(rate):
        raise ValueError("give a concurrency or a finite request rate")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    offsets = arrival_offsets(len(requests), rate, burstiness, seed)
    workers = concurrency or len(requests)
    gate = threading.Semaphore(concurrency or len(requests))
    records: list[RequestRecord | None] = [None] * len(requests)
    bar = None
    if progress:
        bar = tqdm(total=len(requests), desc=label or "requests", unit="req")

    def one(i: int) -> None:
        try:
            records[i] = send_one(requests[i])
        finally:
            gate.release()
            if bar is not None:
                bar.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(workers, 512)), thread_name_prefix="bench") as pool:
        for i, off in enumerate(offsets):
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            gate.acquire()
            pool.submit(one, i)
    duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return RunResult(label, concurrency, rate, burstiness, duration, [r or RequestRecord(error="not sent") for r in records])


# --- reporting --------------------------------------------------------------------------------------


def summary_table(metrics: Sequence[dict[str, Any]]) -> str:
    rows = []
    for m in metrics:
        rows.append((
            m["label"], m["completed"], m["failed"], m["request_throughput"], m["output_tokens_per_s"],
            m["ttft_ms"]["p50"], m["ttft_ms"]["p99"], m["tpot_ms"]["p50"], m["itl_ms"]["p50"], m["itl_ms"]["p99"],
            m["e2e_ms"]["p50"], m["e2e_ms"]["p99"], m.get("goodput", "-"),
        ))
    return format_table(["load", "ok", "failed", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                         "ITL p50 ms", "ITL p99 ms", "E2E p50 ms", "E2E p99 ms", "goodput req/s"], rows)


def plot_sweep(runs: Sequence[RunResult], metrics: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Throughput against latency across the sweep, and the TTFT and ITL distributions per load."""
    import matplotlib  # optional dependency (the `plot` extra): only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    x = [m["output_tokens_per_s"] for m in metrics]
    for key, style, name in (("tpot_ms", "o-", "TPOT p50"), ("e2e_ms", "s--", "E2E p50 / 10")):
        y = [m[key]["p50"] / (10 if key == "e2e_ms" else 1) for m in metrics]
        a.plot(x, y, style, label=name)
    for m, xi in zip(metrics, x):
        a.annotate(m["label"], (xi, m["tpot_ms"]["p50"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xlabel("output tokens/s")
    a.set_ylabel("ms")
    a.set_title("throughput vs latency")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    labels = [m["label"] for m in metrics]
    for ax, name, get in ((b, "TTFT", lambda r: [x.ttft for x in r.records if x.ok]),
                          (c, "inter-token latency", lambda r: [v for x in r.records if x.ok for v in x.itl])):
        data = [np.array(get(r)) * 1e3 for r in runs]
        data = [d if d.size else np.array([np.nan]) for d in data]
        ax.boxplot(data, showfliers=False, whis=(1, 99))
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{name} (whiskers p1-p99)")
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "BenchRequest",
    "RequestRecord",
    "SLO",
    "send",
    "RunResult",
    "synthetic_requests",
    "dataset_requests",
    "arrival_offsets",
    "run_load",
    "latency_stats",
    "summary_table",
    "plot_sweep",
]
