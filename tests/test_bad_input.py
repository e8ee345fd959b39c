"""The bad-input matrix (docs/reliability.md) over BOTH front ends on one scheduler: each bad
request gets its status (gRPC code / HTTP code) with a message naming the field and the limit, and
a good request is served right after it. Fake engine: tests/helpers/http_fakes.py (vocab 97,
printable ASCII, max_len 64)."""

from __future__ import annotations

import math
import threading

import grpc
import pytest

from jaxinfer.scheduler import Request
from server import jaxinfer_pb2 as pb
from tests.helpers import wait_for
from tests.helpers.both import MODEL, Both
from tests.helpers.http_fakes import HttpFakeTokenizer

INV, C400 = grpc.StatusCode.INVALID_ARGUMENT, 400
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def both():
    b = Both()
    yield b
    b.close()


def check_grpc(both: Both, fields: dict, code: grpc.StatusCode, *needles: str) -> None:
    out = both.grpc(**fields)
    assert isinstance(out, grpc.RpcError), f"{fields} was served: {out}"
    assert out.code() == code, (out.code(), out.details())
    for n in needles:
        assert n in out.details(), (n, out.details())
    both.serves_a_good_request()


def check_http(both: Both, status: int, *needles: str, path: str = "/v1/completions", body=None, **kw) -> None:
    r = both.http(path, body, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    for n in needles:
        assert n in err["message"], (n, err["message"])
    both.serves_a_good_request()


# case id -> (gRPC fields, gRPC code, HTTP completion fields, HTTP code, words the message must name)
TABLE = {
    "empty prompt": (dict(prompt=""), INV, dict(prompt=""), C400, ("prompt", "empty")),
    "prompt over the context": (dict(prompt="a" * 80), INV, dict(prompt="a" * 80), C400, ("max_len=64",)),
    "max_tokens 0": (dict(prompt="ab", max_tokens=0), INV, dict(prompt="ab", max_tokens=0), C400, ("max_tokens=0", ">= 1")),
    "max_tokens negative": (dict(prompt="ab", max_tokens=-3), INV, dict(prompt="ab", max_tokens=-3), C400, ("max_tokens=-3",)),
    "max_tokens huge": (dict(prompt="ab", max_tokens=2**31 - 1), INV, dict(prompt="ab", max_tokens=10**12), C400,
                        ("max_tokens",)),
    "temperature NaN": (dict(prompt="ab", temperature=NAN), INV, dict(prompt="ab", temperature=NAN), C400,
                        ("temperature", "[0, 100]")),
    "temperature +inf": (dict(prompt="ab", temperature=INF), INV, dict(prompt="ab", temperature=INF), C400,
                         ("temperature", "[0, 100]")),
    "temperature negative": (dict(prompt="ab", temperature=-1), INV, dict(prompt="ab", temperature=-1), C400,
                             ("temperature", "[0, 100]")),
    "top_p NaN": (dict(prompt="ab", top_p=NAN), INV, dict(prompt="ab", top_p=NAN), C400, ("top_p", "(0, 1]")),
    "top_p 0": (dict(prompt="ab", top_p=0), INV, dict(prompt="ab", top_p=0), C400, ("top_p", "(0, 1]")),
    "top_p -inf": (dict(prompt="ab", top_p=-INF), INV, dict(prompt="ab", top_p=-INF), C400, ("top_p",)),
    "top_k negative": (dict(prompt="ab", top_k=-2), INV, dict(prompt="ab", top_k=-2), C400, ("top_k",)),
    "top_k over the vocabulary": (dict(prompt="ab", top_k=98), INV, dict(prompt="ab", top_k=98), C400, ("top_k", "97")),
    "min_p 1": (dict(prompt="ab", min_p=1.0), INV, dict(prompt="ab", min_p=1.0), C400, ("min_p", "[0, 1)")),
    "min_p NaN": (dict(prompt="ab", min_p=NAN), INV, dict(prompt="ab", min_p=NAN), C400, ("min_p",)),
    "repetition_penalty 0": (dict(prompt="ab", repetition_penalty=0), INV, dict(prompt="ab", repetition_penalty=0), C400,
                             ("repetition_penalty", "(0, 10]")),
    "repetition_penalty +inf": (dict(prompt="ab", repetition_penalty=INF), INV, dict(prompt="ab", repetition_penalty=INF),
                                C400, ("repetition_penalty",)),
    "presence_penalty 3": (dict(prompt="ab", presence_penalty=3), INV, dict(prompt="ab", presence_penalty=3), C400,
                           ("presence_penalty", "[-2, 2]")),
    "presence_penalty NaN": (dict(prompt="ab", presence_penalty=NAN), INV, dict(prompt="ab", presence_penalty=NAN), C400,
                             ("presence_penalty",)),
    "frequency_penalty -inf": (dict(prompt="ab", frequency_penalty=-INF), INV, dict(prompt="ab", frequency_penalty=-INF),
                               C400, ("frequency_penalty", "[-2, 2]")),
    "seed at 2^63": (dict(prompt="ab", seed=2**63, temperature=1.0), INV, dict(prompt="ab", seed=2**63, temperature=1.0),
                     C400, ("seed", "2^63")),
    "logprobs over the limit": (dict(prompt="ab", logprobs=99), INV, dict(prompt="ab", logprobs=99), C400, ("logprobs",)),
    "min_tokens over max_tokens": (dict(prompt="ab", max_tokens=2, min_tokens=5), INV,
                                   dict(prompt="ab", max_tokens=2, min_tokens=5), C400, ("min_tokens",)),
    "token id out of the vocabulary": (dict(prompt_token_ids=[1, 97]), INV, dict(prompt=[1, 97]), C400,
                                       ("97", "vocab_size=97")),
    "negative token id": (dict(prompt_token_ids=[1, -1]), INV, dict(prompt=[1, -1]), C400, ("-1", "vocab_size=97")),
    "stop token id out of the vocabulary": (dict(prompt="ab", stop_token_ids=[500]), INV,
                                            dict(prompt="ab", stop_token_ids=[500]), C400, ("stop_token_ids", "500")),
    "more stop strings than allowed": (dict(prompt="ab", stop=list("vwxyz")), INV, dict(prompt="ab", stop=list("vwxyz")),
                                       C400, ("5 stop strings", "limit 4")),
    "stop string over the length limit": (dict(prompt="ab", stop=["z" * 9]), INV, dict(prompt="ab", stop=["z" * 9]),
                                          C400, ("stop[0]", "1..8")),
    "empty stop string": (dict(prompt="ab", stop=[""]), INV, dict(prompt="ab", stop=[""]), C400, ("stop[0]",)),
    "text outside the vocabulary": (dict(prompt="ab\u00e9"), INV, dict(prompt="ab\u00e9"), C400, ("prompt",)),
    "two prompts at once": (dict(prompt="ab", prompt_token_ids=[1]), INV, None, None, ("exactly one",)),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_grpc_bad_field(both, case):
    fields, code, _, _, needles = TABLE[case]
    check_grpc(both, fields, code, *needles)


@pytest.mark.parametrize("case", [c for c in TABLE if TABLE[c][2] is not None])
def test_http_bad_field(both, case):
    _, _, body, status, needles = TABLE[case]
    check_http(both, status, *needles, body={"model": MODEL, **body})


# -- HTTP only: fields and encodings the proto cannot express -----------------------------------------


@pytest.mark.parametrize(
    "body, needles",
    [
        ({"prompt": "ab", "n": 5}, ("n=5", "[1, 4]")),
        ({"prompt": "ab", "n": 0}, ("n=0",)),
        ({"prompt": "ab", "bogus_field": 1}, ("unknown field", "bogus_field")),
        ({"prompt": "ab", "max_tokens": "ten"}, ("max_tokens",)),
        ({"prompt": "ab", "temperature": "hot"}, ("temperature",)),
        ({"prompt": {"a": 1}}, ("prompt",)),
        ({"prompt": "ab", "stop": 5}, ("stop",)),
        ({"max_tokens": 3}, ("prompt", "required")),
    ],
    ids=["n too large", "n zero", "unknown field", "max_tokens a string", "temperature a string",
         "prompt an object", "stop a number", "prompt missing"],
)
def test_http_bad_body(both, body, needles):
    check_http(both, 400, *needles, body={"model": MODEL, **body})


@pytest.mark.parametrize(
    "content", [b'{"prompt": "ab\xff\xfe"}', b'{"prompt": "ab"', b"[1, 2]", b"not json"],
    ids=["invalid UTF-8", "truncated JSON", "a JSON array", "not JSON"],
)
def test_http_undecodable_body(both, content):
    check_http(both, 400, content=content)


def test_http_oversized_body(both):
    check_http(both, 413, "65536", body={"model": MODEL, "prompt": "a" * (70 << 10)})


def test_grpc_oversized_message(both):
    out = both.grpc(prompt="a" * (70 << 10))
    assert isinstance(out, grpc.RpcError) and out.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in out.details()
    both.serves_a_good_request()


def test_grpc_undecodable_message_is_invalid_argument(both):
    """Invalid UTF-8 in a string field and a field of the wrong wire type: the request cannot be
    parsed, which is the client's fault (INVALID_ARGUMENT), not the server's (INTERNAL)."""
    raw = both.channel.unary_stream("/jaxinfer.v1.Inference/Generate", request_serializer=None,
                                    response_deserializer=pb.GenerateResponse.FromString)
    for wire in (b"\x12\x03a\xff\xfe", b"\x15\x01\x02\x03"):  # prompt = b"a\xff\xfe"; prompt as a fixed32
        with pytest.raises(grpc.RpcError) as e:
            list(raw(wire, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
        assert "GenerateRequest" in e.value.details()
    both.serves_a_good_request()


# -- chat -------------------------------------------------------------------------------------------


def test_chat_message_with_an_unknown_role(both):
    msgs = [{"role": "wizard", "content": "hi"}]
    check_grpc(both, dict(messages=[pb.ChatMessage(role="wizard", content="hi")]), INV, "wizard")
    check_http(both, 400, "wizard", path="/v1/chat/completions", body={"model": MODEL, "messages": msgs})


class NoTemplateTokenizer(HttpFakeTokenizer):
    apply_chat_template = None
    chat_template = None


def test_a_model_without_a_chat_template():
    b = Both(tokenizer=NoTemplateTokenizer())
    try:
        check_grpc(b, dict(messages=[pb.ChatMessage(role="user", content="hi")]), INV, "messages", "no chat template")
        check_http(b, 400, "no chat template", path="/v1/chat/completions",
                   body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    finally:
        b.close()


# -- auth, queue, drain -----------------------------------------------------------------------------


def test_missing_or_wrong_token():
    b = Both(token="s3cret")
    good_md, good_h = [("authorization", "Bearer s3cret")], {"authorization": "Bearer s3cret"}
    try:
        for md in (None, [("authorization", "Bearer nope")]):
            out = b.grpc(prompt="ab", metadata=md)
            assert isinstance(out, grpc.RpcError) and out.code() == grpc.StatusCode.UNAUTHENTICATED, out
        for h in (None, {"authorization": "Bearer nope"}):
            r = b.http(body={"model": MODEL, "prompt": "ab"}, headers=h)
            assert r.status_code == 401, r.text
        b.serves_a_good_request(headers=good_h, metadata=good_md)
    finally:
        b.close()


def test_queue_full():
    b = Both(max_queue_requests=1)
    eng, sched = b.engine, b.server.scheduler
    try:
        eng.gate.clear()  # the loop blocks in its first decode: nothing leaves the queue
        held = [sched.submit(Request((1, 2), 2))]
        wait_for(lambda: eng.active_rows() == 1)
        held.append(sched.submit(Request((1, 2), 2)))  # the one request the queue holds
        out = b.grpc(prompt="ab")
        assert isinstance(out, grpc.RpcError) and out.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue_requests=1" in out.details()
        r = b.http(body={"model": MODEL, "prompt": "ab"})
        assert r.status_code == 429 and "max_queue_requests=1" in r.json()["error"]["message"]
        eng.gate.set()
        for s in held:
            assert list(s)[-1].finish_reason == "length"
        b.serves_a_good_request()
    finally:
        eng.gate.set()
        b.close()


def test_draining():
    b = Both()
    eng, sched = b.engine, b.server.scheduler
    try:
        eng.gate.clear()
        held = sched.submit(Request((1, 2), 2))
        wait_for(lambda: eng.active_rows() == 1)
        drain = threading.Thread(target=sched.drain, args=(10.0,))
        drain.start()
        wait_for(lambda: not sched.load().accepting)
        out = b.grpc(prompt="ab")
        assert isinstance(out, grpc.RpcError) and out.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in out.details()
        r = b.http(body={"model": MODEL, "prompt": "ab"})
        assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
        eng.gate.set()  # the request in flight still completes: everyone else is served
        assert list(held)[-1].finish_reason == "length"
        drain.join(10)
    finally:
        eng.gate.set()
        b.close()
