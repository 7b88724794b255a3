"""Image bombs and crafted image headers against a real server.

Each is refused with INVALID_ARGUMENT and a one-line message naming the field,
at the cost of reading a header: the render process's memory does not move,
nothing is logged as internal, and the next call is served. Two servers, one
after the other: the default --image-formats, and one that lets in the
containers (ICO, ICNS) and the odd readers (DDS, SPIDER), so that the pixel
limit and the exception handling are what refuse them.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.server.test_media import bomb, dds_with_unknown_pixel_format, reset_peak_rss, spider_stack_image
from tests.support import ServerProcess, running_server

FIELD = "messages[0].content[1].image.data"
DEFAULT_FORMATS = "PNG, JPEG, WEBP, GIF, BMP"
WIDENED_FORMATS = "PNG, JPEG, ICO, ICNS, DDS, SPIDER"
EMBEDDED_BOMB = "an embedded image of 256000000 pixels exceeds the limit of 67108864 pixels (--max-image-pixels)"

CRAFTED: dict[str, Callable[[], bytes]] = {
    "ICO bomb": lambda: bomb("ICO"),
    "ICNS bomb": lambda: bomb("ICNS"),
    "DDS pixel format 0x4000": dds_with_unknown_pixel_format,
    "SPIDER stack header": spider_stack_image,
}

# What each server answers to each: (--image-formats, case) -> the message after the field.
EXPECTED = {
    ("default", "ICO bomb"): f"ICO images are not accepted (--image-formats: {DEFAULT_FORMATS})",
    ("default", "ICNS bomb"): f"ICNS images are not accepted (--image-formats: {DEFAULT_FORMATS})",
    ("default", "DDS pixel format 0x4000"): f"DDS images are not accepted (--image-formats: {DEFAULT_FORMATS})",
    ("default", "SPIDER stack header"): "not an image file PIL can decode",
    ("widened", "ICO bomb"): EMBEDDED_BOMB,
    ("widened", "ICNS bomb"): EMBEDDED_BOMB,
    ("widened", "DDS pixel format 0x4000"): "corrupt image (Unknown pixel format flags 16384)",
    ("widened", "SPIDER stack header"): "corrupt image ('SpiderImageFile' object has no attribute 'stkoffset')",
}


@pytest.fixture(scope="module", params=["default", "widened"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    args = [] if request.param == "default" else ["--image-formats", WIDENED_FORMATS.replace(" ", "")]
    with running_server("--workers", "1", *args) as server:
        yield request.param, server


def with_image(data: bytes) -> pb.RenderTrainingSampleRequest:
    parts = [pb.ContentPart(text="What is this?"), pb.ContentPart(image=pb.MediaPart(data=data))]
    return pb.RenderTrainingSampleRequest(
        model="qwen3-vl",
        messages=[pb.Message(role="user", parts=pb.ContentParts(parts=parts)), pb.Message(role="assistant", text="A.")],
    )


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_growth_mib(pids: list[int], call: Callable[[], None]) -> dict[int, float]:
    """How far each process's resident memory rose during `call`: its peak (VmHWM, reset first) where
    the kernel lets the peak be reset, else its RSS after; either way over its RSS before."""
    resettable = all(reset_peak_rss(pid) for pid in pids)
    before = {pid: status_kib(pid, "VmRSS") for pid in pids}
    call()
    return {pid: (status_kib(pid, "VmHWM" if resettable else "VmRSS") - before[pid]) / 1024 for pid in pids}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_images_are_refused_cheaply_naming_the_field(served: tuple[str, ServerProcess], case: str) -> None:
    formats, server = served
    data = CRAFTED[case]()
    with grpc.insecure_channel(server.target) as channel:
        stub = RenderServiceStub(channel)
        assert stub.RenderTrainingSample(with_image(small_png()), timeout=120).sample.token_ids  # warm
        caught: list[grpc.RpcError] = []

        def call() -> None:
            with pytest.raises(grpc.RpcError) as raised:
                stub.RenderTrainingSample(with_image(data), timeout=120)
            caught.append(raised.value)

        # The decoded bomb cost the render process +230 MiB; reading a header costs nothing to see.
        growth = memory_growth_mib(server.render_processes(), call)
        assert max(growth.values()) < 24, growth
        assert caught[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught[0].details() == f"{FIELD}: {EXPECTED[formats, case]}"
        # The server goes on serving, and nothing was an internal error.
        assert stub.RenderTrainingSample(with_image(small_png()), timeout=120).sample.token_ids
    assert "Traceback" not in server.log() and "unexpected error" not in server.log()


def test_the_http_render_refuses_the_bomb_too(served: tuple[str, ServerProcess]) -> None:
    formats, server = served
    image = {"image": {"data": base64.b64encode(bomb("ICO")).decode()}}  # bytes: base64 in the JSON mapping
    message = {"role": "user", "parts": {"parts": [{"text": "Hi"}, image]}}
    body = json.dumps({"model": "qwen3-vl", "messages": [message, {"role": "assistant", "text": "A."}]}).encode()
    request = urllib.request.Request(f"{server.http}/v1/render_training_sample", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    assert json.loads(caught.value.read()) == {
        "code": "INVALID_ARGUMENT",
        "message": f"{FIELD}: {EXPECTED[formats, 'ICO bomb']}",
    }
