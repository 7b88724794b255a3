"""Every limit, on a live server: refused with the limit's name and value, and the server keeps serving."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from PIL import Image

from render_server.limits import COUNT_FROM_BYTES
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.methods import METHODS, call, post
from tests.support import ServerProcess, running_server

SMALL_LIMITS = (
    "--workers", "1", "--max-messages", "4", "--max-images", "1", "--max-image-mb", "0.5",
    "--max-image-pixels", "40000", "--max-tokens", "400", "--max-request-mb", "1",
    "--max-tensor-mb", "0.0625", "--max-batch-requests", "3",
)  # fmt: skip


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerProcess]:
    with running_server(*SMALL_LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def stub(limited: ServerProcess) -> Iterator[RenderServiceStub]:
    with grpc.insecure_channel(limited.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield RenderServiceStub(channel)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(*images: bytes) -> pb.Message:
    parts = [pb.ContentPart(image=pb.MediaPart(data=data)) for data in images]
    return pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="look"), *parts]))


def request(model: str, *messages: pb.Message) -> pb.RenderTrainingSampleRequest:
    return pb.RenderTrainingSampleRequest(model=model, messages=[*messages, pb.Message(role="assistant", text="ok")])


def noise_png(side: int) -> bytes:
    # Incompressible, so that a modest pixel count makes many bytes.
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


CASES = {
    "messages": (
        request("qwen3", *[pb.Message(role="user", text="hi")] * 4),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: 5 messages exceed the limit of 4 (--max-messages)",
    ),
    "images": (
        request("qwen3-vl", image_message(png(8, 8), png(8, 8))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[2].image: 2 images exceed the limit of 1 per request (--max-images)",
    ),
    "image bytes": (
        request("qwen3-vl", image_message(noise_png(500))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: ",
    ),
    "image pixels": (
        request("qwen3-vl", image_message(png(300, 200))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: 300x200 pixels exceed the limit of 40000 pixels (--max-image-pixels)",
    ),
    "tokens": (
        request("qwen3", pb.Message(role="user", text="word " * 500)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: the sample has ",
    ),
    "text": (
        # 400 tokens x 16 bytes: refused unread, before the tokenizer would find ~900 tokens.
        request("qwen3", pb.Message(role="user", text="x" * 7000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: 70",
    ),
    "request size": (
        request("qwen3", pb.Message(role="user", text="x" * (2 * 1024 * 1024))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_limit_is_enforced_and_named(stub: RenderServiceStub, case: str) -> None:
    bad, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RenderTrainingSample(bad, timeout=60)
    assert caught.value.code() == code, caught.value.details()
    assert caught.value.details().startswith(message)
    limit_flag = {
        "image bytes": "(--max-image-mb)",
        "tokens": "over the limit of 400 (--max-tokens)",
        "text": "bytes of text exceed the limit of 6400 bytes (--max-tokens 400 x --max-text-bytes-per-token 16)",
        "request size": "1048576",
    }.get(case)
    if limit_flag:
        assert limit_flag in caught.value.details()
    ok = stub.RenderTrainingSample(request("qwen3", pb.Message(role="user", text="hi")), timeout=60)
    assert len(ok.sample.token_ids) > 0


def test_a_decompression_bomb_is_refused_before_it_is_decoded(limited: ServerProcess, tmp_path: Path) -> None:
    # 1-bit, all zeros: a few KiB of PNG that would decode to 1.2 GB of RGB.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    bomb = buffer.getvalue()
    assert len(bomb) < 200_000
    (worker,) = limited.workers()
    with grpc.insecure_channel(limited.target) as channel, pytest.raises(grpc.RpcError) as caught:
        RenderServiceStub(channel).RenderTrainingSample(request("qwen3-vl", image_message(bomb)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "20000x20000 pixels exceed the limit" in caught.value.details()
    peak_kib = int(
        next(
            line for line in Path(f"/proc/{worker}/status").read_text().splitlines() if line.startswith("VmHWM")
        ).split()[1]
    )
    assert peak_kib < 1_000_000, f"worker peaked at {peak_kib} KiB: the bomb was decoded"


# -- the Renderer protocol's methods -----------------------------------------------------------------

HI = pb.Message(role="user", text="hi")


def ids_request(method: str, field: str, count: int) -> Message:
    """A request of `method` whose id list `field` holds `count` ids."""
    ids = [9707] * count
    if method == "ParseResponse":
        if field == "prompt_ids":
            return pb.ParseResponseRequest(model="qwen3", token_ids=[9707], prompt_ids=pb.TokenIds(ids=ids))
        return pb.ParseResponseRequest(model="qwen3", token_ids=ids)
    request = pb.BridgeToNextTurnRequest(model="qwen3", new_messages=[HI])
    if field == "both":  # the previous turn is one sample: together at most --max-tokens
        request.previous_prompt_ids.extend(ids[: count // 2])
        request.previous_completion_ids.extend(ids[count // 2 :])
    else:
        getattr(request, field).extend(ids)
    return request


def tensor_request(nbytes: int) -> Message:
    tensor = pb.Tensor(dtype="|u1", shape=[nbytes], data=bytes(nbytes))
    item = pb.MultiModalItem(fields=[pb.NamedTensor(name="pixel_values", tensor=tensor)])
    return pb.BridgeToNextTurnRequest(
        model="qwen3-vl",
        previous_prompt_ids=[151644],
        new_messages=[HI],
        previous_multi_modal_data=pb.MultiModalData(mm_items=[pb.ModalityItems(modality="image", items=[item])]),
    )


# Each: a method, its request at a given size, the limit, and the message past it ({n}: the size).
PROTOCOL_LIMITS: dict[str, tuple[str, Callable[[int], Message], int, str]] = {
    "ParseResponse token_ids": (
        "ParseResponse",
        lambda n: ids_request("ParseResponse", "token_ids", n),
        400,
        "token_ids: {n} token ids exceed the limit of 400 (--max-tokens)",
    ),
    "ParseResponse prompt_ids": (
        "ParseResponse",
        lambda n: ids_request("ParseResponse", "prompt_ids", n),
        400,
        "prompt_ids: {n} token ids exceed the limit of 400 (--max-tokens)",
    ),
    "BridgeToNextTurn previous_prompt_ids": (
        "BridgeToNextTurn",
        lambda n: ids_request("BridgeToNextTurn", "previous_prompt_ids", n),
        400,
        "previous_prompt_ids: {n} token ids exceed the limit of 400 (--max-tokens)",
    ),
    "BridgeToNextTurn previous_completion_ids": (
        "BridgeToNextTurn",
        lambda n: ids_request("BridgeToNextTurn", "previous_completion_ids", n),
        400,
        "previous_completion_ids: {n} token ids exceed the limit of 400 (--max-tokens)",
    ),
    "BridgeToNextTurn both id lists": (
        "BridgeToNextTurn",
        lambda n: ids_request("BridgeToNextTurn", "both", n),
        400,
        "previous_prompt_ids + previous_completion_ids: {n} token ids exceed the limit of 400 (--max-tokens)",
    ),
    "BridgeToNextTurn new_messages": (
        "BridgeToNextTurn",
        lambda n: pb.BridgeToNextTurnRequest(model="qwen3", previous_prompt_ids=[151644], new_messages=[HI] * n),
        4,
        "new_messages: {n} messages exceed the limit of 4 (--max-messages)",
    ),
    "Render messages": (
        "Render",
        lambda n: pb.RenderRequest(model="qwen3", messages=[HI] * n),
        4,
        "messages: {n} messages exceed the limit of 4 (--max-messages)",
    ),
    "BridgeToNextTurn tensors": (
        "BridgeToNextTurn",
        tensor_request,
        65536,
        "previous_multi_modal_data.mm_items['image'][0]['pixel_values']: "
        "tensors of {n} bytes exceed the limit of 65536 bytes (--max-tensor-mb)",
    ),
    "ParseResponse tools": (
        "ParseResponse",
        lambda n: pb.ParseResponseRequest(model="qwen3", token_ids=[9707], tools_json=json.dumps(["x" * (n - 4)])),
        6400,
        "tools_json: {n} bytes of text exceed the limit of 6400 bytes "
        "(--max-tokens 400 x --max-text-bytes-per-token 16)",
    ),
    "DescribeRenderer kwargs": (
        "DescribeRenderer",
        lambda n: pb.DescribeRendererRequest(model="qwen3", chat_template_kwargs_json=json.dumps({"k": "x" * (n - 9)})),
        6400,
        "chat_template_kwargs_json: {n} bytes of text exceed the limit of 6400 bytes "
        "(--max-tokens 400 x --max-text-bytes-per-token 16)",
    ),
}


# Also refused before they are parsed, when large enough to be counted on the wire (the "both" limit is
# checked on the lists decoded: each is within --max-tokens by then).
COUNTED_ON_THE_WIRE = {case for case in PROTOCOL_LIMITS if "messages" in case or "_ids" in case}


@pytest.mark.parametrize("case", list(PROTOCOL_LIMITS))
def test_the_protocol_methods_limits_hold_at_their_value_and_are_named_past_it(
    stub: RenderServiceStub, limited: ServerProcess, case: str
) -> None:
    name, make, limit, message = PROTOCOL_LIMITS[case]
    method = METHODS[name]
    with grpc.insecure_channel(limited.target) as channel:
        at = call(channel, method, make(limit).SerializeToString())
        assert at[0] == grpc.StatusCode.OK or message.split(":")[0] not in at[1], at
        assert call(channel, method, make(limit + 1).SerializeToString()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            message.format(n=limit + 1),
        )
        if case in COUNTED_ON_THE_WIRE:
            # Large enough to be counted on the wire, before it is parsed: the same refusal.
            big = make(40_000)
            assert len(big.SerializeToString()) >= COUNT_FROM_BYTES
            expected = message.format(n=40_000)
            if "messages exceed" in message:  # counting stops at the first past the limit
                expected = expected.split(":")[0] + ": more messages than the limit of 4 (--max-messages)"
            assert call(channel, method, big.SerializeToString()) == (grpc.StatusCode.INVALID_ARGUMENT, expected)
        if method.route:
            status, answer = post(limited.http, method.route, json_format.MessageToJson(make(limit + 1)).encode())
            assert (status, answer) == (400, {"code": "INVALID_ARGUMENT", "message": message.format(n=limit + 1)})


def test_a_batch_past_its_limit_ends_the_stream_naming_the_limit(limited: ServerProcess) -> None:
    with grpc.insecure_channel(limited.target) as channel:
        stub = RenderServiceStub(channel)
        results = list(
            stub.Renders(iter([pb.RendersRequest(requests=[pb.RenderRequest(model="qwen3", messages=[HI])] * 3)]))
        )
        assert [result.index for answer in results for result in answer.results] == [0, 1, 2]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Renders(iter([pb.RendersRequest(requests=[pb.RenderRequest(model="qwen3", messages=[HI])] * 4)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details() == "request batch after index 0: 4 requests exceed the limit of 3 (--max-batch-requests)"
    )


def test_a_request_holding_more_values_than_its_messages_allow_is_refused_before_it_is_parsed(
    limited: ServerProcess,
) -> None:
    """64 values a message on average: one message of 300 parts is past it (4 messages x 64 here)."""
    parts = pb.ContentParts(parts=[pb.ContentPart(text="x" * 250)] * 300)
    request = pb.RenderRequest(model="qwen3", messages=[pb.Message(role="user", parts=parts)])
    with grpc.insecure_channel(limited.target) as channel:
        assert call(channel, METHODS["Render"], request.SerializeToString()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages.parts.parts.text: more values than the limit of 256 in one request (sub-messages, strings, "
            "numbers other than token ids: 64 x --max-messages 4)",
        )
