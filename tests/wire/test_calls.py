"""render_wire.calls: a Calls batch carries each call's own request and answer bytes, unchanged and in order."""

from __future__ import annotations

import grpc
import pytest

from render_wire.calls import METHODS, decode_call_results, decode_calls, encode_call_result, encode_calls
from render_wire.errors import InvalidArgumentError, ModelNotFoundError, RenderError, UnimplementedError
from render_wire.pb import render_pb2 as pb
from render_wire.requests import encode_parse_request, encode_render_request
from render_wire.wireformat import WireMessage


def requests() -> list[tuple[str, bytes, float | None]]:
    render = encode_render_request(
        "qwen3",
        [{"role": "user", "content": "hi"}],
        tools=None,
        add_generation_prompt=True,
        chat_template_kwargs=None,
        ids_only=False,
    )
    parse = encode_parse_request("qwen3", [1, 2, 3], tools=None, prompt_ids=[7], chat_template_kwargs=None)
    sample = pb.RenderTrainingSampleRequest(model="qwen3", messages=[pb.Message(role="user", text="x")])
    bridge = pb.BridgeToNextTurnRequest(model="qwen3", previous_prompt_ids=[1, 2])
    return [
        ("Render", render.SerializeToString(), 1.5),
        ("ParseResponse", parse.SerializeToString(), None),
        ("RenderTrainingSample", sample.SerializeToString(), 0.0),
        ("BridgeToNextTurn", bridge.SerializeToString(), 30.0),
    ]


def test_a_batch_carries_each_calls_method_request_bytes_and_timeout() -> None:
    calls = requests()
    decoded = decode_calls(encode_calls(calls))
    assert [(call.method, bytes(call.request), call.timeout) for call in decoded] == calls
    # The same batch as upb reads it: each call in its own oneof member.
    batch = pb.CallsRequest.FromString(encode_calls(calls))
    assert [call.WhichOneof("call") for call in batch.calls] == ["render", "parse", "sample", "bridge"]
    assert batch.calls[0].render.SerializeToString() == calls[0][1]


def test_each_call_gets_its_own_answer_or_its_own_error() -> None:
    answer = WireMessage(pb.RenderResponse(tokens=pb.RenderedTokens(token_ids=[5, 6])).SerializeToString())
    parsed = WireMessage(pb.ParseResponseResponse(parsed=pb.ParsedResponse(content="ok")).SerializeToString())
    response = WireMessage()
    response.extend(encode_call_result("Render", answer))
    response.extend(encode_call_result("ParseResponse", UnimplementedError("messages: video", error_type="X")))
    response.extend(encode_call_result("ParseResponse", parsed))
    response.extend(encode_call_result("Render", ModelNotFoundError("model: no model 'nope'")))
    results = decode_call_results(response.join(), ["Render", "ParseResponse", "ParseResponse", "Render"])
    assert bytes(results[0]) == answer.join()
    assert isinstance(results[1], UnimplementedError) and isinstance(results[1], NotImplementedError)
    assert (results[1].details, results[1].error_type) == ("messages: video", "X")
    assert bytes(results[2]) == parsed.join()
    assert isinstance(results[3], ModelNotFoundError) and results[3].code is grpc.StatusCode.NOT_FOUND


def test_an_answer_that_does_not_match_its_batch_is_refused() -> None:
    answer = WireMessage(pb.RenderResponse().SerializeToString())
    one = encode_call_result("Render", answer).join()
    with pytest.raises(RenderError, match="1 results for 2 calls"):
        decode_call_results(one, ["Render", "Render"])
    with pytest.raises(RenderError, match="a result of a ParseResponse call carries 0 answers"):
        decode_call_results(one, ["ParseResponse"])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (pb.CallRequest(), "calls[0]: set exactly one of sample, render, parse and bridge"),
        (pb.CallRequest(render=pb.RenderRequest(model="m"), timeout=-1), "calls[0].timeout: must be a number"),
        (pb.CallRequest(render=pb.RenderRequest(model="m"), timeout=float("nan")), "calls[0].timeout"),
    ],
)
def test_a_malformed_call_is_refused_naming_it(call: pb.CallRequest, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field.replace("[", r"\[").replace("]", r"\]")):
        decode_calls(pb.CallsRequest(calls=[call]).SerializeToString())


def test_a_call_carrying_two_requests_is_refused() -> None:
    # Valid protobuf (upb would keep the last member of the oneof), but never sent: refused, not guessed.
    call = pb.CallRequest(render=pb.RenderRequest(model="m")).SerializeToString()
    call += pb.CallRequest(parse=pb.ParseResponseRequest(model="m")).SerializeToString()
    batch = b"\x0a" + bytes([len(call)]) + call
    assert pb.CallsRequest.FromString(batch).calls[0].WhichOneof("call") == "parse"
    with pytest.raises(InvalidArgumentError, match=r"calls\[0\]: set exactly one"):
        decode_calls(batch)


def test_bytes_that_are_no_batch_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"request: not a valid render\.v1\.CallsRequest"):
        decode_calls(b"\xff\xff\xff")


def test_the_oneof_members_are_numbered_as_the_methods() -> None:
    numbers = {field.name: field.number for field in pb.CallRequest.DESCRIPTOR.oneofs_by_name["call"].fields}
    results = {field.name: field.number for field in pb.CallResult.DESCRIPTOR.oneofs_by_name["result"].fields}
    assert numbers == {"sample": 1, "render": 2, "parse": 3, "bridge": 4}
    assert results == {**numbers, "error": 5}
    assert sorted(METHODS.values()) == [1, 2, 3, 4]
