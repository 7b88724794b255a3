"""Property and fuzz tests: the conversion layer keeps what it is given; a live server
answers whatever it is sent with a proper status and keeps serving."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from render_client import RenderClient, build_training_sample
from render_server.json_calls import ROUTES
from render_wire.errors import MAX_DETAILS_BYTES, InvalidArgumentError
from render_wire.jsonvalue import dump_json, load_json
from render_wire.pb import render_pb2 as pb
from render_wire.requests import decode_request, encode_request
from tests.methods import METHODS, SERVICE, Method, call, post
from tests.support import ServerProcess

# --- strategies -------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | text
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool"])
parts = st.lists(
    st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, text),
        st.builds(lambda t: {"type": "thinking", "thinking": t}, text),
        st.builds(
            lambda b, t: {"type": t, "image": b},
            st.binary(min_size=1, max_size=30).map(lambda b: b"\x89" + b),
            st.sampled_from(["image", "image_url"]),
        ),
        st.builds(lambda t: {"type": "text", "text": t, "image": None}, text),
    ),
    max_size=3,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": text, "type": st.just("function")},
        optional={"function": st.fixed_dictionaries({"name": text}, optional={"arguments": text | json_values})},
    ),
    max_size=2,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.none() | text | parts,
            "tool_calls": st.none() | tool_calls,
            "tool_call_id": st.none() | text,
            "name": text,
            "reasoning_content": st.none() | text,
            "weight": json_values,
        },
    ),
    max_size=5,
)


def json_fields(message: dict[str, Any]) -> list[Any]:
    """The values of a message that travel as JSON text: tool-call arguments and unmodelled keys."""
    arguments = [call["function"].get("arguments") for call in message.get("tool_calls") or () if "function" in call]
    return [arguments, message.get("weight")]


@settings(max_examples=300, deadline=None)
@given(
    messages, st.none() | st.lists(json_values, max_size=3), st.none() | st.dictionaries(text, json_values, max_size=3)
)
def test_requests_round_trip_exactly(conversation: list[dict], tools: list | None, kwargs: dict | None) -> None:
    request = encode_request("m", conversation, tools=tools, chat_template_kwargs=kwargs)
    decoded = decode_request(pb.RenderTrainingSampleRequest.FromString(request.SerializeToString()))
    assert decoded.messages == conversation
    # JSON-carried values keep their types and key order: the same JSON text.
    for got, sent in zip(decoded.messages, conversation, strict=True):
        assert json.dumps(json_fields(got)) == json.dumps(json_fields(sent))
    assert json.dumps(decoded.tools) == json.dumps(tools)
    assert json.dumps(decoded.chat_template_kwargs) == json.dumps(kwargs or None)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_json_values_round_trip_with_their_types(value: Any) -> None:
    assert json.dumps(load_json(dump_json(value, "x"), "x")) == json.dumps(value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_a_refusal(data: bytes) -> None:
    try:
        request = pb.RenderTrainingSampleRequest.FromString(data)
    except Exception as exc:  # the server's lenient parser turns this into INVALID_ARGUMENT
        assert type(exc).__name__ == "DecodeError"
        return
    try:
        decode_request(request)
    except InvalidArgumentError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(text)
def test_invalid_json_is_refused_naming_the_field(junk: str) -> None:
    try:
        json.loads(junk)
    except ValueError:
        pass
    else:
        return
    request = encode_request(
        "m", [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    )
    request.messages[0].tool_calls.calls[0].function.arguments_json = junk
    with pytest.raises(
        InvalidArgumentError, match=r"^messages\[0\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"
    ):
        decode_request(request)


# --- a live server ----------------------------------------------------------

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as opened:
        yield opened


@pytest.fixture(scope="module")
def raw(channel: grpc.Channel) -> Any:
    """RenderTrainingSample taking raw bytes, as a broken or hostile client would send them."""
    return lambda data, timeout: call(channel, METHODS["RenderTrainingSample"], data, timeout)


def status_of(raw: Any, data: bytes) -> grpc.StatusCode:
    code, details = raw(data, timeout=120)
    if code != grpc.StatusCode.OK:
        assert details and "\n" not in details and "Traceback" not in details, details
        assert len(details.encode()) <= MAX_DETAILS_BYTES, details
    return code


def user_with_image(data: bytes) -> bytes:
    message = pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(image=pb.MediaPart(data=data))]))
    return pb.RenderTrainingSampleRequest(model="qwen3-vl", messages=[message]).SerializeToString()


def test_every_method_and_route_is_attacked() -> None:
    """The tables below attack every method: a method added to the proto needs its entry in tests/methods.py."""
    assert set(METHODS) == {method.name for method in SERVICE.methods}
    assert {method.route for method in METHODS.values() if method.route} == set(ROUTES)
    for method in METHODS.values():
        rpc = SERVICE.methods_by_name[method.name]
        if method.member is not None:  # Calls: its example is one call's request
            carried = rpc.input_type.fields[0].message_type.fields_by_name[method.member].message_type
        else:
            carried = rpc.input_type.fields[0].message_type if method.batch else rpc.input_type
        assert method.request_class.DESCRIPTOR is carried


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS)
def test_each_example_is_answered(server: ServerProcess, channel: grpc.Channel, method: Method) -> None:
    """The requests the attacks start from are good ones, over gRPC and JSON alike."""
    assert call(channel, method, method.example.SerializeToString()) == (grpc.StatusCode.OK, "")
    if method.route:
        body = json_format.MessageToJson(method.example).encode()
        assert post(server.http, method.route, body)[0] == 200


def method_status(channel: grpc.Channel, method: Method, data: bytes) -> grpc.StatusCode:
    return status_of(lambda data, timeout: call(channel, method, data, timeout), data)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000))
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS)
def test_random_request_bytes(channel: grpc.Channel, method: Method, data: bytes) -> None:
    assert method_status(channel, method, data) in ALLOWED


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS)
def test_mutated_requests(channel: grpc.Channel, method: Method, data: st.DataObject) -> None:
    """The example with bytes flipped, cut out or put in: what a fuzzer finds near a valid request."""
    body = bytearray(method.example.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body)))
        edit = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if edit == "flip" and position < len(body):
            body[position] ^= data.draw(st.integers(1, 255))
        elif edit == "cut":
            del body[position : position + data.draw(st.integers(1, 8))]
        else:
            body[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    assert method_status(channel, method, bytes(body)) in ALLOWED


# JSON bodies: the request's own keys (and others) with any JSON values, as a client in any language may send.
json_bodies = st.dictionaries(
    st.sampled_from(
        sorted({field.name for method in METHODS.values() for field in method.request_class.DESCRIPTOR.fields})
    )
    | text,
    json_values,
    max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_bodies | json_values, st.booleans())
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_random_json_bodies(server: ServerProcess, route: str, body: Any, with_model: bool) -> None:
    if with_model and isinstance(body, dict):
        body = {**body, "model": "qwen3"}
    status, answer = post(server.http, route, json.dumps(body).encode())
    assert status in (200, 400, 404, 501), (status, answer)
    if status != 200:
        assert set(answer) <= {"code", "message", "error_type", "error_detail"} and answer["message"], answer
        assert len(answer["message"].encode()) <= MAX_DETAILS_BYTES and "\n" not in answer["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=5000))
def test_random_bytes_as_images(raw: Any, data: bytes) -> None:
    assert status_of(raw, user_with_image(data)) == grpc.StatusCode.INVALID_ARGUMENT


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 64), 50).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["PNG", "JPEG"]), st.floats(0.0, 0.98))
def test_truncated_images(raw: Any, fmt: str, keep: float) -> None:
    data = encoded(fmt)
    assert status_of(raw, user_with_image(data[: max(1, int(len(data) * keep))])) == grpc.StatusCode.INVALID_ARGUMENT


def test_hostile_payloads(raw: Any, server: ServerProcess) -> None:
    def request(**fields: Any) -> pb.RenderTrainingSampleRequest:
        return pb.RenderTrainingSampleRequest(model="qwen3", messages=[pb.Message(role="user", text="hi")], **fields)

    nested = "[" * 100_000 + "]" * 100_000
    call = pb.ToolCall(function=pb.ToolCallFunction(name="f", arguments_json=nested))
    deep = request()
    deep.messages.append(pb.Message(role="assistant", text="", tool_calls=pb.ToolCalls(calls=[call])))
    cases = {
        "deeply nested tool arguments": deep.SerializeToString(),
        "invalid JSON tools": request(tools_json="[{").SerializeToString(),
        "invalid JSON kwargs": request(chat_template_kwargs_json="{'a': 1}").SerializeToString(),
        "invalid JSON extras": pb.RenderTrainingSampleRequest(
            model="qwen3", messages=[pb.Message(role="user", text="x", extra_json="nope")]
        ).SerializeToString(),
        # field 1 (model), a string, holding bytes that are not UTF-8
        "invalid UTF-8": b"\x0a\x02\xff\xfe"
        + pb.RenderTrainingSampleRequest(messages=[pb.Message(role="user", text="x")]).SerializeToString(),
        "truncated protobuf": request().SerializeToString()[:-3],
        "huge string": pb.RenderTrainingSampleRequest(
            model="qwen3", messages=[pb.Message(role="user", text="lorem ipsum " * 120_000)]
        ).SerializeToString(),
    }
    for name, data in cases.items():
        code = status_of(raw, data)
        expected = (
            {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
            if name == "huge string"
            else {grpc.StatusCode.INVALID_ARGUMENT}
        )
        assert code in expected, (name, code)
    with RenderClient(server.target, timeout=60) as client:
        assert build_training_sample(client.renderer("qwen3"), [{"role": "user", "content": "still here?"}]).token_ids
