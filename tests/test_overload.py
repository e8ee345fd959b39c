"""Concurrency beyond the limits: at twice what the server can hold, the extra streams are refused
at once (RESOURCE_EXHAUSTED / 429, naming the limit), never left waiting in silence, and the ones
it holds complete once the engine moves (the HTTP fake engine's decode waits on ``gate``)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx

from server import jaxinfer_pb2 as pb
from tests.helpers import wait_for
from tests.helpers.both import MODEL, Both


def _grpc_call(both: Both):
    try:
        out = list(both.stub.Generate(pb.GenerateRequest(prompt="ab", max_tokens=2), timeout=20))
        return "ok", out[-1].finish_reason, time.monotonic()
    except grpc.RpcError as e:
        return e.code(), e.details(), time.monotonic()


def _http_call(both: Both):
    r = httpx.post(both.url + "/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2}, timeout=20)
    return r.status_code, r.text, time.monotonic()


def _overload(both: Both, call, n: int, held: int, refusal) -> tuple[list, list]:
    """``n`` simultaneous calls while the engine is stuck (at most ``held`` can be held). Returns
    (refused, the others); every refusal came while the engine was still stuck, i.e. at once."""
    eng = both.engine
    eng.gate.clear()
    pool = ThreadPoolExecutor(n)
    try:
        futures = [pool.submit(call, both) for _ in range(n)]
        wait_for(lambda: sum(f.done() for f in futures) >= n - held, timeout=10)
        time.sleep(0.2)  # let any refusal still on its way arrive before the engine moves
        released = time.monotonic()
        eng.gate.set()
        results = [f.result(timeout=20) for f in futures]
    finally:
        eng.gate.set()
        pool.shutdown(wait=True)
    both.idle()
    refused = [r for r in results if r[0] == refusal]
    assert all(at < released for _, _, at in refused), "a refusal waited for the engine"
    return refused, [r for r in results if r[0] != refusal]


def test_grpc_streams_beyond_the_worker_pool_are_resource_exhausted_at_once():
    # 4 worker threads, fewer than the rows + queue (4 + 8): the pool is the limit
    both = Both(max_queue_requests=8, max_workers=4)
    try:
        refused, completed = _overload(both, _grpc_call, n=8, held=4, refusal=grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(refused) == 4 and len(completed) == 4
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _, _ in refused), refused
        assert all(code == "ok" and reason == "length" for code, reason, _ in completed), completed
        both.serves_a_good_request()
    finally:
        both.close()


def test_grpc_streams_beyond_the_rows_and_queue_are_resource_exhausted_at_once():
    both = Both(max_queue_requests=2)  # 4 rows + 2 queued = 6; the default pool is larger
    try:
        refused, completed = _overload(both, _grpc_call, n=12, held=6, refusal=grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(refused) >= 6
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_requests=2" in msg
                   for code, msg, _ in refused), refused
        assert all(code == "ok" and reason == "length" for code, reason, _ in completed), completed
        both.serves_a_good_request()
    finally:
        both.close()


def test_http_requests_beyond_the_rows_and_queue_are_429_at_once():
    both = Both(max_queue_requests=2)
    try:
        refused, completed = _overload(both, _http_call, n=12, held=6, refusal=429)
        assert len(refused) >= 6
        assert all(status == 429 and "max_queue_requests=2" in text for status, text, _ in refused), refused
        assert all(status == 200 for status, _, _ in completed), completed
        both.serves_a_good_request()
    finally:
        both.close()
