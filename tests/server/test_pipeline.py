"""The live service's statuses: bad input gets a clear status and the server keeps serving.

These send hand-built protobuf requests straight to a real server process, as
a caller in any language could, bypassing the Python client's own checks.
"""

from __future__ import annotations

import http.server
import io
import threading
from collections.abc import Iterator
from typing import ClassVar

import grpc
import numpy as np
import pytest
import renderers
from PIL import Image

from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.reference import reference_renderer
from tests.support import ServerProcess


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[RenderServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield RenderServiceStub(channel)


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def user_with_image(data: bytes, *, kind: str = "image") -> pb.Message:
    part = pb.ContentPart()
    getattr(part, kind).data = data
    return pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="look"), part]))


def request(model: str = "qwen3-vl", *messages: pb.Message) -> pb.RenderTrainingSampleRequest:
    return pb.RenderTrainingSampleRequest(
        model=model, messages=[*messages, pb.Message(role="assistant", text="A red square.")]
    )


def valid_request() -> pb.RenderTrainingSampleRequest:
    return request("qwen3-vl", user_with_image(png()))


def malformed_tool_call() -> pb.RenderTrainingSampleRequest:
    call = pb.ToolCall(id="c1", type="function", function=pb.ToolCallFunction(name="f", arguments_json="{not json"))
    return request(
        "qwen3",
        pb.Message(role="user", text="call f"),
        pb.Message(role="assistant", text="", tool_calls=pb.ToolCalls(calls=[call])),
    )


def truncated_png() -> bytes:
    data = png((64, 64))
    return data[: len(data) // 2]


CASES = {
    "image URL": (
        request("qwen3-vl", user_with_image(b"https://example.com/cat.png")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: looks like a URL or file path",
    ),
    "file path": (
        request("qwen3-vl", user_with_image(b"/etc/passwd")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: looks like a URL or file path",
    ),
    "file URI": (
        request("qwen3-vl", user_with_image(b"file:///etc/hostname")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: looks like a URL or file path",
    ),
    "corrupt image": (
        request("qwen3-vl", user_with_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: ",
    ),
    "truncated image": (
        request("qwen3-vl", user_with_image(truncated_png())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].content[1].image.data: corrupt image",
    ),
    "unknown model": (
        request("gpt-7", pb.Message(role="user", text="hi")),
        grpc.StatusCode.NOT_FOUND,
        "model: no model 'gpt-7'",
    ),
    "unknown role": (
        request("qwen3", pb.Message(role="user", text="hi"), pb.Message(role="wizard", text="abracadabra")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[1].role: 'wizard' is not a role model 'qwen3' accepts",
    ),
    "malformed tool call": (
        malformed_tool_call(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[1].tool_calls[0].function.arguments: not valid JSON",
    ),
    "video": (
        request("qwen3-vl", user_with_image(b"\x00\x00\x00\x18ftypmp42", kind="video")),
        grpc.StatusCode.UNIMPLEMENTED,
        "messages: Video parts are not yet supported by Qwen3VLRenderer.",
    ),
    "renderer rejects": (
        request("qwen3-template", pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="x")]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages: UndefinedError: 'list object' has no attribute 'startswith'",
    ),
    "chat_template_kwargs a renderer refuses": (
        pb.RenderTrainingSampleRequest(
            model="qwen3",
            messages=[pb.Message(role="user", text="hi")],
            chat_template_kwargs_json='{"enable_thinking": [1]}',
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chat_template_kwargs.enable_thinking: Input should be a valid boolean (got [1])",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_requests_get_a_status_and_a_one_line_message(stub: RenderServiceStub, case: str) -> None:
    bad, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RenderTrainingSample(bad, timeout=60)
    assert caught.value.code() == code
    assert caught.value.details().startswith(message)
    assert "\n" not in caught.value.details() and "Traceback" not in caught.value.details()
    # The server keeps serving.
    response = stub.RenderTrainingSample(valid_request(), timeout=60)
    assert response.sample.HasField("multi_modal_data") and len(response.sample.token_ids) > 0


def test_renderer_errors_carry_the_exception_type(stub: RenderServiceStub) -> None:
    bad, _, _ = CASES["renderer rejects"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RenderTrainingSample(bad, timeout=60)
    # jinja2's class with its module, for clients to rebuild it (render_wire.errors).
    assert ("render-error-type", "jinja2.exceptions.UndefinedError") in tuple(caught.value.trailing_metadata())


def test_text_models_ignore_images_as_renderers_does_without_decoding_them(stub: RenderServiceStub) -> None:
    # In-process, a text renderer skips image parts without opening them, so a
    # broken image does not fail the sample there, and does not fail it here.
    with_garbage = stub.RenderTrainingSample(request("qwen3", user_with_image(b"\x89PNG garbage")), timeout=60)
    without = stub.RenderTrainingSample(
        request("qwen3", pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="look")]))),
        timeout=60,
    )
    assert list(with_garbage.sample.token_ids) == list(without.sample.token_ids)
    assert not with_garbage.sample.HasField("multi_modal_data")


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_server_never_fetches_a_url_a_request_names(stub: RenderServiceStub) -> None:
    web = http.server.HTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_port}/cat.png"
    try:
        for data in (url.encode(), f"  {url}".encode()):
            with pytest.raises(grpc.RpcError) as caught:
                stub.RenderTrainingSample(request("qwen3-vl", user_with_image(data)), timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A URL in a text part or an unmodelled key is text to render, never a source.
        message = pb.Message(role="user", text=url, extra_json=f'{{"image_url": "{url}"}}')
        stub.RenderTrainingSample(request("qwen3-vl", message), timeout=60)
    finally:
        web.shutdown()
    assert _RecordingHandler.hits == []


def test_list_models(stub: RenderServiceStub) -> None:
    response = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert [model.id for model in response.models] == ["qwen3", "qwen3-vl", "deepseek-v4", "qwen3-template"]
    assert response.renderers_version == "0.1.12" and response.transformers_version
    assert all(model.tokenizer_fingerprint.startswith("sha256:") for model in response.models)


def test_pixel_tensors_travel_in_their_compact_form_and_decode_to_the_processors_bytes(
    stub: RenderServiceStub,
) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((512, 384), 60).convert("RGB").save(buffer, format="PNG")
    message = request("qwen3-vl", user_with_image(buffer.getvalue()))
    response = stub.RenderTrainingSample(message, timeout=60)
    [item] = response.sample.multi_modal_data.mm_items[0].items
    pixels = next(field.tensor for field in item.fields if field.name == "pixel_values")
    assert pixels.HasField("compact") and not pixels.data, "pixel_values came raw"
    rows, width = pixels.shape
    assert len(pixels.compact.codes) * 8 == rows * width * 4  # an eighth of the float32 bytes
    # What a caller in another language does with the proto's documented decoding:
    groups, repeats = len(pixels.compact.table_sizes), pixels.compact.repeats
    span = width // (groups * repeats)
    codes = np.frombuffer(pixels.compact.codes, dtype=np.uint8).reshape(rows, groups, span)
    tables = np.split(
        np.frombuffer(pixels.compact.tables, dtype=pixels.dtype), np.cumsum(pixels.compact.table_sizes)[:-1]
    )
    rebuilt = np.stack([np.stack([tables[g][codes[:, g]]] * repeats, axis=1) for g in range(groups)], axis=1)
    expected = renderers.build_training_sample(
        reference_renderer("qwen3-vl"),
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image", "image": buffer.getvalue()}],
            },
            {"role": "assistant", "content": "A red square."},
        ],
    ).multi_modal_data.mm_items["image"][0]["pixel_values"]
    assert rebuilt.reshape(rows, width).tobytes() == expected.tobytes() and expected.shape == (rows, width)
