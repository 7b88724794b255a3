"""Every method of the render service, with a request it answers, for the tests that attack them all.

The fuzz, adversarial and bomb tests (tests/test_fuzz.py, tests/server/test_security.py,
tests/server/test_request_bombs.py) take their methods from METHODS, and
`test_every_method_and_route_is_attacked` (tests/test_fuzz.py) fails until a method
added to render.proto, or a route to the HTTP port, has its entry here: the next one
gets every attack without a line of its own.

`call` sends raw bytes the way a hostile client would; a stream method's request is
one item of a batch, and its answer that item's result (status and message); so is
a Calls batch's (its one call, of the method its `member` names).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from render_wire.pb import render_pb2 as pb
from render_wire.wireformat import varint

SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]

_USER = pb.Message(role="user", text="What is 2 + 2?")
_ANSWER = pb.Message(role="assistant", text="4")


@dataclass(frozen=True)
class Method:
    """An RPC, a small request it answers OK (a stream's: one item of a batch), and its JSON route."""

    name: str
    example: Message
    route: str | None = None  # the HTTP port's POST route; None: gRPC only
    batch: Any = None  # a stream's batch message class (its items are `example`s)
    member: str | None = None  # Calls: the CallRequest member `example` goes in as the batch's one call

    @property
    def request_class(self) -> Any:
        return type(self.example)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "RenderTrainingSample",
            pb.RenderTrainingSampleRequest(model="qwen3", messages=[_USER, _ANSWER]),
            "/v1/render_training_sample",
        ),
        Method(
            "RenderTrainingSamples",
            pb.RenderTrainingSampleRequest(model="qwen3", messages=[_USER, _ANSWER]),
            batch=pb.RenderTrainingSamplesRequest,
        ),
        Method("ListModels", pb.ListModelsRequest()),
        Method("Render", pb.RenderRequest(model="qwen3", messages=[_USER], add_generation_prompt=True), "/v1/render"),
        Method("Renders", pb.RenderRequest(model="qwen3", messages=[_USER]), batch=pb.RendersRequest),
        Method(
            "ParseResponse",
            pb.ParseResponseRequest(model="qwen3", token_ids=[19, 151645], prompt_ids=pb.TokenIds(ids=[151644])),
            "/v1/parse_response",
        ),
        Method(
            "BridgeToNextTurn",
            pb.BridgeToNextTurnRequest(
                model="qwen3", previous_prompt_ids=[151644, 872], previous_completion_ids=[19], new_messages=[_USER]
            ),
            "/v1/bridge_to_next_turn",
        ),
        Method("DescribeRenderer", pb.DescribeRendererRequest(model="qwen3"), "/v1/describe_renderer"),
        Method("Calls", pb.RenderRequest(model="qwen3", messages=[_USER], add_generation_prompt=True), member="render"),
    )
}


def call(channel: grpc.Channel, method: Method, data: bytes, timeout: float = 120) -> tuple[grpc.StatusCode, str]:
    """(status, message) of `method` called with `data` as its request (a stream's: as a batch's one item)."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.member is not None:
            number = pb.CallRequest.DESCRIPTOR.fields_by_name[method.member].number
            item = varint(number << 3 | 2) + varint(len(data)) + data
            batch = varint(1 << 3 | 2) + varint(len(item)) + item  # calls = [{member: data}], byte for byte
            answer = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(
                batch, timeout=timeout
            )
            (outcome,) = pb.CallsResponse.FromString(answer).results
            if outcome.WhichOneof("result") != "error":
                return grpc.StatusCode.OK, ""
            return next(code for code in grpc.StatusCode if code.value[0] == outcome.error.code), outcome.error.message
        if method.batch is None:
            channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(data, timeout=timeout)
            return grpc.StatusCode.OK, ""
        batch = varint(1 << 3 | 2) + varint(len(data)) + data  # requests = [data], byte for byte
        answers = channel.stream_stream(path, request_serializer=bytes, response_deserializer=bytes)(
            iter([batch]), timeout=timeout
        )
        results = [result for answer in answers for result in pb.RendersResponse.FromString(answer).results]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    (result,) = results  # RenderTrainingSamplesResponse's results read the same (see samples.encode_result)
    if not result.HasField("error"):
        return grpc.StatusCode.OK, ""
    return next(code for code in grpc.StatusCode if code.value[0] == result.error.code), result.error.message


def call_batch(
    channel: grpc.Channel, method: Method, batch: bytes, timeout: float = 120
) -> tuple[grpc.StatusCode, str]:
    """(status, message) of a stream `method` sent `batch` as its one batch message: how the stream ended."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        for _ in channel.stream_stream(path, request_serializer=bytes, response_deserializer=bytes)(
            iter([batch]), timeout=timeout
        ):
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def post(http: str, route: str, body: bytes, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) of a POST."""
    request = urllib.request.Request(f"{http}{route}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
