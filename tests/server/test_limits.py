"""Every limit, on a live server: refused with the limit's name and value, and the server keeps serving."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.support import ServerProcess, running_server

SMALL_LIMITS = (
    "--workers", "1", "--max-messages", "4", "--max-images", "1", "--max-image-mb", "0.5",
    "--max-image-pixels", "40000", "--max-tokens", "400", "--max-request-mb", "1",
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
