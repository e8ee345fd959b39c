"""Property-based fuzzing (hypothesis) of request validation through both front ends over the HTTP
fake engine: random field values and random text end in success or an invalid-argument status
(INVALID_ARGUMENT / 400), never INTERNAL / 500 or a hang, and leave no row, page or live request
behind. Each property is bounded (max_examples) so the file runs in seconds."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import jaxinfer_pb2 as pb
from tests.helpers.both import MODEL, Both

BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

int32 = st.integers(-(2**31), 2**31 - 1)
small = st.integers(-3, 70)  # around the limits (context 64, vocabulary 97 is reached by ids below)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
near = st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 100.0, 1e-9, -1.0, float("nan"), float("inf"), float("-inf")])
text = st.text(max_size=12)  # any code points: most are outside the fake vocabulary
ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
token_ids = st.lists(st.integers(-2, 100), max_size=8)


@pytest.fixture(scope="module")
def both():
    b = Both(max_queue_requests=8)
    yield b
    b.close()


def _maybe(strategy):
    return st.one_of(st.none(), strategy)


grpc_fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(text, ascii_text),
        "prompt_token_ids": token_ids,
        "max_tokens": st.one_of(small, int32),
        "min_tokens": st.one_of(small, int32),
        "temperature": st.one_of(near, float32),
        "top_k": st.one_of(small, int32),
        "top_p": st.one_of(near, float32),
        "min_p": st.one_of(near, float32),
        "repetition_penalty": st.one_of(near, float32),
        "presence_penalty": st.one_of(near, float32),
        "frequency_penalty": st.one_of(near, float32),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(text, max_size=6),
        "stop_token_ids": st.lists(st.one_of(st.integers(-2, 100), int32), max_size=4),
        "ignore_eos": st.booleans(),
        "logprobs": st.one_of(st.integers(-1, 22), int32),
        "echo": st.booleans(),
        "truncate_prompt": st.booleans(),
    },
)


@BOUNDED
@given(fields=grpc_fields)
def test_grpc_random_requests_succeed_or_are_invalid_arguments(both, fields):
    out = both.grpc(**fields)
    if isinstance(out, grpc.RpcError):
        assert out.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, out.code(), out.details())
        assert out.details()
    else:
        assert out and out[-1].finish_reason in ("stop", "length"), fields
    both.idle()


json_scalar = st.one_of(st.none(), st.booleans(), int32, st.integers(), near, st.floats(), text, ascii_text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(text, inner, max_size=3)), max_leaves=6)
known = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
         "logprobs", "echo", "stream", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
         "ignore_eos", "best_of", "logit_bias", "user", "stream_options", "suffix"]
prompts = st.one_of(ascii_text, text, token_ids, st.lists(ascii_text, max_size=3), st.lists(token_ids, max_size=2),
                    json_value)
http_body = st.fixed_dictionaries(
    {"prompt": prompts},
    optional={
        **{k: json_value for k in known if k != "prompt"},
        "max_tokens": st.one_of(small, json_value),
        "n": st.one_of(st.integers(-1, 6), json_value),
        "temperature": st.one_of(near, json_value),
        "stream": st.booleans(),
        "bogus": json_value,
    },
)


def _check_http(both: Both, path: str, body) -> None:
    r = both.http(path, body)
    assert r.status_code in (200, 400), (body, r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    elif body.get("stream") is True:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text
        assert all("error" not in json.loads(e) for e in events[:-1]), r.text
    both.idle()


@BOUNDED
@given(body=http_body)
def test_http_random_completions_succeed_or_are_400(both, body):
    _check_http(both, "/v1/completions", {"model": MODEL, **body})


chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                         "content": st.one_of(ascii_text, text, st.none())}), max_size=3),
        json_value)},
    optional={"max_tokens": st.one_of(small, json_value), "temperature": st.one_of(near, json_value),
              "top_logprobs": st.one_of(st.integers(-1, 22), json_value), "logprobs": json_value,
              "stream": st.booleans(), "n": st.integers(-1, 6), "stop": st.one_of(text, st.lists(text, max_size=6))},
)


@BOUNDED
@given(body=chat_body)
def test_http_random_chat_requests_succeed_or_are_400(both, body):
    _check_http(both, "/v1/chat/completions", {"model": MODEL, **body})


@BOUNDED
@given(raw=st.binary(max_size=64))
def test_random_bytes_are_invalid_arguments_on_both_front_ends(both, raw):
    call = both.channel.unary_stream("/jaxinfer.v1.Inference/Generate", request_serializer=None,
                                     response_deserializer=pb.GenerateResponse.FromString)
    try:
        out = list(call(raw, timeout=10))
        assert out[-1].finish_reason in ("stop", "length")  # bytes that parse as a good request
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, e.code(), e.details())
    r = both.http(content=raw)
    assert r.status_code in (200, 400), (raw, r.status_code, r.text)
    both.idle()
