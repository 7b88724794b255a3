"""The Python client against a live server: the drop-in API, sync and asyncio."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import subprocess
import sys
import threading
import time

import pytest
import renderers
from PIL import Image

from render_client import (
    InvalidArgumentError,
    ModelNotFoundError,
    RenderClient,
    RenderedTrainingSample,
    RenderError,
    SampleRequest,
    UnimplementedError,
    aio,
    build_training_sample,
)
from tests.client.clients import NewClient, slow_request
from tests.reference import reference_renderer, sample_differences
from tests.support import ROOT, ServerProcess, corpus


def test_the_drop_in_has_the_signature_of_renderers_build_training_sample() -> None:
    ours = inspect.signature(build_training_sample).parameters
    theirs = inspect.signature(renderers.build_training_sample).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    assert list(inspect.signature(aio.build_training_sample).parameters) == list(theirs)


def image_conversation() -> dict:
    return next(c for c in corpus() if "images" in c["tags"])


def with_image_source(conversation: dict, convert) -> list[dict]:
    """The conversation with each image_url part's data: URI replaced by convert(uri)."""
    messages = []
    for message in conversation["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": convert(part["image_url"]["url"])} if part["type"] == "image_url" else part
                for part in content
            ]
        messages.append({**message, "content": content})
    return messages


def decoded(uri: str) -> bytes:
    return base64.b64decode(uri.partition(",")[2])


def test_images_as_bytes_data_uris_and_pil_images_render_alike(client: RenderClient) -> None:
    conversation = image_conversation()
    expected = renderers.build_training_sample(reference_renderer("qwen3-vl"), conversation["messages"])
    remote = client.renderer("qwen3-vl")
    for source in (lambda uri: uri, decoded, lambda uri: Image.open(io.BytesIO(decoded(uri)))):
        sample = build_training_sample(remote, with_image_source(conversation, source))
        assert sample.multi_modal_data is not None
        assert sample_differences(expected, sample) == []


def test_errors_are_the_exceptions_trainer_code_catches(client: RenderClient) -> None:
    with pytest.raises(ModelNotFoundError):
        client.render(SampleRequest("nope", [{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="role_to_mask is required") as caught:
        build_training_sample(client.renderer("qwen3-template"), [{"role": "user", "content": "hi"}])
    assert isinstance(caught.value, InvalidArgumentError) and caught.value.error_type == "ValueError"
    video = [{"role": "user", "content": [{"type": "video", "video": b"\x00\x00\x00\x18ftypmp42"}]}]
    with pytest.raises(NotImplementedError):
        build_training_sample(client.renderer("qwen3-vl"), video)
    with pytest.raises(UnimplementedError):
        build_training_sample(client.renderer("qwen3-vl"), video)


def test_list_models(client: RenderClient) -> None:
    models = client.list_models()
    assert models.renderers_version == "0.1.12"
    assert models.get("qwen3-vl").accepts_images and not models.get("qwen3").accepts_images
    assert models.get("deepseek-v4").renderer == "deepseek-v4"
    with pytest.raises(KeyError):
        models.get("nope")


def test_the_asyncio_client_renders_what_the_blocking_one_does(server: ServerProcess, client: RenderClient) -> None:
    conversations = corpus()[:20]

    async def render_all() -> list:
        async with aio.AsyncRenderClient(server.target, timeout=60) as async_client:
            remote = async_client.renderer("qwen3", chat_template_kwargs={"enable_thinking": False})
            assert (await async_client.list_models()).get("qwen3").id == "qwen3"
            with pytest.raises(ModelNotFoundError):
                await async_client.render(SampleRequest("nope", [{"role": "user", "content": "x"}]))
            return await asyncio.gather(
                *(aio.build_training_sample(remote, c["messages"], tools=c.get("tools")) for c in conversations)
            )

    remote = client.renderer("qwen3", chat_template_kwargs={"enable_thinking": False})
    for conversation, sample in zip(conversations, asyncio.run(render_all()), strict=True):
        assert sample == build_training_sample(remote, conversation["messages"], tools=conversation.get("tools"))


def test_each_drop_in_refuses_the_other_clients_renderer(server: ServerProcess, client: RenderClient) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

    async def both() -> None:
        async with aio.AsyncRenderClient(server.target, timeout=60) as async_client:
            with pytest.raises(TypeError, match=r"use render_client\.aio\.build_training_sample"):
                build_training_sample(async_client.renderer("qwen3"), messages)  # not a coroutine, never awaited
            with pytest.raises(TypeError, match=r"use render_client\.build_training_sample"):
                await aio.build_training_sample(client.renderer("qwen3"), messages)
            # Each with its own client's renderer: the same sample.
            assert await aio.build_training_sample(async_client.renderer("qwen3"), messages) == build_training_sample(
                client.renderer("qwen3"), messages
            )

    asyncio.run(both())


CLIENT_ONLY = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "renderers", "PIL", "tokenizers", "jinja2", "render_server"}:
            raise ImportError(f"client code imported {name}")

sys.meta_path.insert(0, Refuse())
from render_client import RenderClient, build_training_sample

conversation = json.loads(sys.argv[2])
with RenderClient(sys.argv[1], timeout=60) as client:
    sample = build_training_sample(client.renderer("qwen3-vl"), conversation["messages"], tools=conversation.get("tools"))
items = sample.multi_modal_data.mm_items["image"]
print(json.dumps({"token_ids": sample.token_ids, "pixels": [item["pixel_values"].tobytes().hex()[:64] for item in items]}))
"""


def test_the_client_needs_only_grpc_protobuf_and_numpy(server: ServerProcess, client: RenderClient) -> None:
    conversation = image_conversation()
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, server.target, json.dumps(conversation)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    expected = build_training_sample(client.renderer("qwen3-vl"), conversation["messages"])
    assert got["token_ids"] == expected.token_ids
    assert got["pixels"] == [
        item["pixel_values"].tobytes().hex()[:64] for item in expected.multi_modal_data.mm_items["image"]
    ]


def test_the_client_refuses_before_sending(client: RenderClient) -> None:
    with pytest.raises(InvalidArgumentError, match=r"messages\[0\].content\[0\].image: URLs and file paths"):
        build_training_sample(
            client.renderer("qwen3-vl"), [{"role": "user", "content": [{"type": "image", "image": "http://x/y.png"}]}]
        )


def test_closing_the_client_ends_its_calls_in_flight_with_a_render_error(
    server: ServerProcess, new_client: NewClient
) -> None:
    own = new_client(server.target, timeout=120)
    request = slow_request(1)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            own.render(request)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    time.sleep(0.5)
    own.close()
    caller.join(timeout=30)
    assert not caller.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], RenderError), outcome  # not resent on a closed channel


def test_closing_the_client_ends_render_many_instead_of_hanging(server: ServerProcess, new_client: NewClient) -> None:
    own = new_client(server.target, timeout=120)
    requests = [slow_request(seed) for seed in range(4)]
    results: list[RenderedTrainingSample | RenderError] = []
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            results.extend(own.render_many(requests, return_exceptions=True))
        except BaseException as exc:
            failure.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(1.0)  # the stream is open and its first render under way
    own.close()
    consumer.join(timeout=30)
    assert not consumer.is_alive(), "render_many hung after the client was closed"
    assert all(isinstance(exc, RenderError) for exc in failure), failure  # a status, not a closed-channel error
    assert failure or (len(results) == 4 and any(isinstance(r, RenderError) for r in results))
