"""render_wire.requests: every corpus conversation and every argument reaches the renderer unchanged,
and what cannot be sent unchanged is refused naming the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from render_wire.errors import InvalidArgumentError
from render_wire.pb import render_pb2 as pb
from render_wire.requests import (
    decode_request,
    encode_bridge_request,
    encode_request,
    message_images,
    request_images,
    with_held_mm_hashes,
)
from tests.support import corpus


def round_trip(messages: list[dict[str, Any]], **kwargs: Any):
    """Encode as the client does, send through the wire format, decode as the server does."""
    request = encode_request("qwen3", messages, **kwargs)
    wire = request.SerializeToString()
    return decode_request(pb.RenderTrainingSampleRequest.FromString(wire))


def expected_after_trip(message: dict[str, Any]) -> dict[str, Any]:
    """A corpus message as the server hands it to the renderer: media as raw bytes."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if part["type"] == "image_url":
            payload = part["image_url"]["url"].partition(",")[2]
            parts.append({"type": "image_url", "image": base64.b64decode(payload)})
        else:
            parts.append(part)
    return {**message, "content": parts}


def test_every_corpus_conversation_reaches_the_server_unchanged() -> None:
    for conversation in corpus():
        arguments = round_trip(conversation["messages"], tools=conversation.get("tools"))
        assert arguments.messages == [expected_after_trip(m) for m in conversation["messages"]], conversation["id"]
        assert arguments.tools == conversation.get("tools")
        # Key order of tool specs is part of what the renderer prints.
        assert json.dumps(arguments.tools) == json.dumps(conversation.get("tools"))


def test_tool_call_arguments_keep_their_form_and_json_types() -> None:
    arguments = {"b": 1, "a": 1.0, "big": 2**70, "neg": -0.0, "text": "naïve 🚀", "nested": [True, None, {"z": 1e-300}]}
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "id": "a", "function": {"name": "f", "arguments": arguments}},
                {"type": "function", "id": "b", "function": {"name": "f", "arguments": '{"x": 1.0}'}},
            ],
        },
    ]
    decoded = round_trip(messages).messages[1]["tool_calls"]
    got = decoded[0]["function"]["arguments"]
    assert got == arguments
    assert list(got) == list(arguments)
    assert type(got["b"]) is int and type(got["a"]) is float and got["big"] == 2**70
    assert str(got["neg"]) == "-0.0"
    assert decoded[1]["function"]["arguments"] == '{"x": 1.0}'


def test_chat_template_kwargs_keep_json_types() -> None:
    kwargs = {"enable_thinking": False, "depth": 1, "ratio": 1.0}
    decoded = round_trip([{"role": "user", "content": "x"}], chat_template_kwargs=kwargs).chat_template_kwargs
    assert decoded == kwargs and type(decoded["depth"]) is int and type(decoded["ratio"]) is float


def test_absent_none_and_empty_stay_apart() -> None:
    messages = [
        {"role": "user", "content": None},
        {"role": "assistant", "content": [], "tool_calls": []},
        {"role": "assistant", "content": "x", "tool_calls": None, "reasoning_content": None, "name": ""},
        {"role": "user"},
    ]
    assert round_trip(messages).messages == messages
    assert round_trip(messages).tools is None
    assert round_trip(messages, tools=[]).tools == []


def test_unmodelled_message_keys_and_null_part_keys_survive() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi", "image": None, "image_url": None}],
            "weight": 0.5,
            "meta": {"source": "web", "n": 3},
        }
    ]
    assert round_trip(messages).messages == messages


def test_per_message_options_become_lists() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    arguments = round_trip(
        messages,
        role_to_mask=lambda m: m["role"] == "assistant",
        message_loss_mask=[1, 0],
        content_sft_roles={"tool"},
        ensure_final_stop=True,
    )
    assert arguments.trainable == [False, True]
    assert arguments.message_loss_mask == [True, False]
    assert arguments.content_sft_roles == frozenset({"tool"})
    assert arguments.ensure_final_stop is True
    plain = round_trip(messages)
    assert plain.trainable is None and plain.message_loss_mask is None and plain.content_sft_roles is None


@pytest.mark.parametrize(
    ("messages", "kwargs", "field"),
    [
        ([{"content": "no role"}], {}, "messages[0].role: missing"),
        ([{"role": 3, "content": "x"}], {}, "messages[0].role: expected a str"),
        ([{"role": "user", "content": 5}], {}, "messages[0].content: expected a str, a list of parts or None"),
        ([{"role": "user", "content": [{"type": "audio"}]}], {}, "messages[0].content[0].type: unsupported"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
            {},
            "messages[0].content[0].image_url: URLs and file paths are not sent",
        ),
        (
            [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}],
            {},
            "messages[0].content[0].image: URLs and file paths are not sent",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": (1, 2)}}]}],
            {},
            "messages[0].tool_calls[0].function.arguments: tuple is not a JSON value",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {1: "x"}}}]}],
            {},
            "messages[0].tool_calls[0].function.arguments: JSON object keys must be str",
        ),
        ([{"role": "user", "content": "\ud800"}], {}, "messages[0].content: not encodable as UTF-8"),
        ([{"role": "user", "content": "x"}], {"role_to_mask": lambda m: 1}, "messages[0]: role_to_mask returned int"),
        (
            [{"role": "user", "content": "x"}],
            {"message_loss_mask": [1, 1]},
            "message_loss_mask: message_loss_mask must have one entry per message",
        ),
        ([{"role": "user", "content": "x"}], {"tools": {"name": "f"}}, "tools: expected a list"),
    ],
)
def test_the_client_refuses_what_it_cannot_send_unchanged(
    messages: list[Any], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        encode_request("qwen3", messages, **kwargs)
    assert str(caught.value).startswith(field)
    assert isinstance(caught.value, ValueError)


def _request_with(mutate: Any) -> pb.RenderTrainingSampleRequest:
    request = encode_request(
        "qwen3",
        [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        ],
    )
    mutate(request)
    return request


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "model", ""), "model: missing"),
        (
            lambda r: setattr(r.messages[1].tool_calls.calls[0].function, "arguments_json", "{nope"),
            "messages[1].tool_calls[0].function.arguments: not valid JSON",
        ),
        (
            lambda r: setattr(r.messages[1].tool_calls.calls[0].function, "arguments_json", '{"a": 1, "a": 2}'),
            "messages[1].tool_calls[0].function.arguments: not valid JSON: duplicate key 'a'",
        ),
        (lambda r: setattr(r, "tools_json", '{"name": "f"}'), "tools_json: must be a JSON array"),
        (lambda r: setattr(r, "chat_template_kwargs_json", "[1]"), "chat_template_kwargs_json: must be a JSON object"),
        (lambda r: setattr(r.messages[0], "role", ""), "messages[0].role: missing"),
        (lambda r: r.messages[0].null_keys.append("role"), "messages[0].null_keys: 'role' is not one of"),
        (
            lambda r: r.messages[1].null_keys.append("tool_calls"),
            "messages[1].null_keys: 'tool_calls' is both set and null",
        ),
        (
            lambda r: setattr(r.messages[0], "extra_json", '{"role": "x"}'),
            "messages[0].extra_json: key 'role' has a field",
        ),
        (lambda r: setattr(r.messages[0], "trainable", True), "messages[1].trainable: unset here but set on other"),
        (lambda r: r.messages[0].parts.parts.add(), "messages[0].content[1]: empty content part"),
        (
            lambda r: setattr(r.messages[0].parts.parts.add().image, "data", b"https://example.com/cat.png"),
            "messages[0].content[1].image.data: looks like a URL or file path",
        ),
        (
            lambda r: setattr(r.messages[0].parts.parts.add().image, "data", b"file:///etc/passwd"),
            "messages[0].content[1].image.data: looks like a URL or file path",
        ),
        (
            lambda r: setattr(r.messages[0].parts.parts.add().image, "data", b"/etc/passwd"),
            "messages[0].content[1].image.data: looks like a URL or file path",
        ),
        (
            lambda r: r.messages[0].parts.parts.add().image.MergeFrom(pb.MediaPart(data=b"\x89PNG", type="video")),
            "messages[0].content[1].image.type: must be one of image, image_url",
        ),
    ],
)
def test_the_server_refuses_malformed_requests_naming_the_field(mutate: Any, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        decode_request(_request_with(mutate))
    assert str(caught.value).startswith(field)
    assert "\n" not in str(caught.value)


def test_process_multimodal_travels_only_when_passed_and_false_sends_no_image() -> None:
    from render_wire.requests import (
        decode_bridge_request,
        decode_render_request,
        encode_bridge_request,
        encode_render_request,
    )

    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]

    def render(process: bool | None) -> Any:
        request = encode_render_request(
            "m", messages, tools=None, add_generation_prompt=True, chat_template_kwargs=None, ids_only=False,
            process_multimodal=process,
        )  # fmt: skip
        return decode_render_request(pb.RenderRequest.FromString(request.SerializeToString()))

    # False: the image part goes as an image part with no data (a URL is not refused: it is not sent).
    placeholder = render(False)
    assert placeholder.process_multimodal is False
    assert placeholder.conversation.messages[0]["content"][1] == {"type": "image_url", "image": b""}
    # True, or unset (the renderer's default): the image itself must go, and a URL is refused before
    # anything is sent.
    for process in (True, None):
        with pytest.raises(InvalidArgumentError, match=r"messages\[0\]\.content\[1\]\.image_url: URLs"):
            render(process)
    image["image_url"] = {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG...").decode()}
    assert render(None).process_multimodal is None and render(True).process_multimodal is True
    assert render(None).conversation.messages[0]["content"][1] == {"type": "image_url", "image": b"\x89PNG..."}
    bridged = decode_bridge_request(
        encode_bridge_request(
            "m", [1, 2], [3], messages, tools=None, previous_multi_modal_data=None, chat_template_kwargs=None,
            process_multimodal=False,
        )
    )  # fmt: skip
    assert bridged.process_multimodal is False and bridged.conversation.messages[0]["content"][1]["image"] == b""


def test_the_images_a_serialised_request_carries_are_found_in_order() -> None:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": b"\x89PNG-one"}, {"type": "text", "text": "and"}]},
        {"role": "assistant", "content": "text only"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,dHdv"}}]},
    ]
    request = encode_request("qwen3-vl", messages)
    assert [bytes(image) for image in request_images(request.SerializeToString(), "RenderTrainingSample")] == [
        b"\x89PNG-one",
        b"two",
    ]
    assert message_images(request.messages) == [b"\x89PNG-one", b"two"]
    bridge = encode_bridge_request(
        "qwen3-vl", [1], [2], messages[2:], tools=None, previous_multi_modal_data=None, chat_template_kwargs=None
    )
    assert [bytes(image) for image in request_images(bridge, "BridgeToNextTurn")] == [b"two"]


@pytest.mark.parametrize(
    ("method", "message_class"),
    [
        ("RenderTrainingSample", pb.RenderTrainingSampleRequest),
        ("Render", pb.RenderRequest),
        ("BridgeToNextTurn", pb.BridgeToNextTurnRequest),
    ],
)
def test_held_hashes_are_added_to_a_serialised_request(method: str, message_class: Any) -> None:
    request = message_class(model="qwen3-vl", held_mm_hashes=["a"]).SerializeToString()
    extended = message_class.FromString(with_held_mm_hashes(request, method, ["b", "c"]))
    assert extended.model == "qwen3-vl" and list(extended.held_mm_hashes) == ["a", "b", "c"]
