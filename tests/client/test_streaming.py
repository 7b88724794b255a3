"""render_many and the RenderTrainingSamples stream: order, per-item errors, bounded in flight."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import grpc
import pytest
from PIL import Image

from render_client import InvalidArgumentError, ModelNotFoundError, RenderClient, SampleRequest, build_training_sample
from render_client.aio import AsyncRenderClient
from render_wire.errors import RenderError
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from render_wire.requests import encode_request
from tests.support import ServerProcess, corpus

BAD_IMAGE = [{"role": "user", "content": [{"type": "image", "image": "https://example.com/cat.png"}]}]


def requests(client: RenderClient, count: int) -> list[SampleRequest]:
    renderer = client.renderer("qwen3")
    conversations = corpus()
    return [
        renderer.request(
            conversations[i % len(conversations)]["messages"], tools=conversations[i % len(conversations)].get("tools")
        )
        for i in range(count)
    ]


def test_results_come_in_input_order_and_match_unary_calls(client: RenderClient) -> None:
    batch = requests(client, 120)
    streamed = list(client.render_many(batch, concurrency=8))
    assert len(streamed) == len(batch)
    for request, sample in zip(batch, streamed, strict=True):
        assert sample == client.render(request)


def test_a_bad_item_gets_its_own_error_and_the_rest_go_on(client: RenderClient) -> None:
    batch = requests(client, 30)
    batch[5] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])  # refused by the server
    batch[9] = SampleRequest("qwen3", BAD_IMAGE)  # refused by the client before sending
    batch[12] = SampleRequest("qwen3", [{"role": "wizard", "content": "x"}])
    results = list(client.render_many(batch, concurrency=4, return_exceptions=True))
    assert isinstance(results[5], ModelNotFoundError)
    assert isinstance(results[9], InvalidArgumentError) and "URLs and file paths" in str(results[9])
    assert isinstance(results[12], InvalidArgumentError) and "messages[0].role" in str(results[12])
    good = [i for i in range(30) if i not in (5, 9, 12)]
    for i in good:
        assert results[i] == client.render(batch[i])


def test_without_return_exceptions_the_error_is_raised_at_its_turn(client: RenderClient) -> None:
    batch = requests(client, 10)
    batch[6] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])
    taken = []
    with pytest.raises(ModelNotFoundError):
        for sample in client.render_many(batch, concurrency=3):
            taken.append(sample)
    assert len(taken) == 6


def test_no_more_than_concurrency_requests_are_taken_ahead(client: RenderClient) -> None:
    batch = requests(client, 60)
    pulled = 0

    def counted() -> Iterator[SampleRequest]:
        nonlocal pulled
        for request in batch:
            pulled += 1
            yield request

    consumed = 0
    high_water = 0
    for _ in client.render_many(counted(), concurrency=5):
        # Taken from the dataset but not yet handed to us, this one included.
        high_water = max(high_water, pulled - consumed)
        consumed += 1
    assert consumed == 60
    assert high_water <= 5


def test_an_iterable_that_raises_raises_at_its_position(client: RenderClient) -> None:
    batch = requests(client, 4)

    def failing() -> Iterator[SampleRequest]:
        yield from batch
        raise RuntimeError("dataset broke")

    taken = []
    with pytest.raises(RuntimeError, match="dataset broke"):
        for sample in client.render_many(failing(), concurrency=2):
            taken.append(sample)
    assert len(taken) == 4


def test_breaking_out_early_does_not_hang(client: RenderClient) -> None:
    for index, _ in enumerate(client.render_many(requests(client, 200), concurrency=16)):
        if index == 3:
            break
    # The client stays usable.
    assert client.render(requests(client, 1)[0]).token_ids


def test_async_render_many(server: ServerProcess, client: RenderClient) -> None:
    batch = requests(client, 40)
    batch[7] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])

    async def collect() -> list:
        async with AsyncRenderClient(server.target, connections=2) as async_client:

            async def produce():
                for request in batch:
                    yield request

            return [
                result async for result in async_client.render_many(produce(), concurrency=6, return_exceptions=True)
            ]

    results = asyncio.run(collect())
    assert isinstance(results[7], ModelNotFoundError)
    for i, result in enumerate(results):
        if i != 7:
            assert result == client.render(batch[i])


def test_the_stream_contract_tags_every_result_once(server: ServerProcess) -> None:
    # Straight on the wire, as a non-Python caller would use it: batches of
    # requests in, results tagged with their index in the stream out.
    sent = [
        pb.RenderTrainingSampleRequest(model="qwen3", messages=[pb.Message(role="user", text=f"hi {i}")])
        for i in range(25)
    ]
    sent[3] = pb.RenderTrainingSampleRequest(model="nope", messages=[pb.Message(role="user", text="x")])
    sent[8].messages[0].role = "wizard"
    batches = [sent[:5], sent[5:6], [], sent[6:25]]
    with grpc.insecure_channel(server.target) as channel:
        responses = list(
            RenderServiceStub(channel).RenderTrainingSamples(
                (pb.RenderTrainingSamplesRequest(requests=batch) for batch in batches), timeout=120
            )
        )
    results = [result for response in responses for result in response.results]
    assert [result.index for result in results] == list(range(25))
    assert results[3].WhichOneof("result") == "error" and results[3].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results[8].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results[8].error.message.startswith("messages[0].role:")
    assert all(results[i].WhichOneof("result") == "sample" for i in range(25) if i not in (3, 8))


def test_large_answers_are_split_across_messages(server: ServerProcess) -> None:
    # A 2048x2048 image has 96 MiB of pixel_values, 12 MiB in their compact form:
    # a batch of three is answered in several messages rather than one of 36 MiB.
    buffer = io.BytesIO()
    Image.new("RGB", (2048, 2048), (30, 60, 90)).save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image", "image": buffer.getvalue()}]}]
    request = encode_request("qwen3-vl", messages)
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        responses = list(
            RenderServiceStub(channel).RenderTrainingSamples(
                iter([pb.RenderTrainingSamplesRequest(requests=[request] * 3)]), timeout=120
            )
        )
    assert [r.index for response in responses for r in response.results] == [0, 1, 2]
    assert len(responses) == 3


def test_render_many_rejects_a_silly_concurrency(client: RenderClient) -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        list(client.render_many([], concurrency=0))
    assert list(client.render_many([], concurrency=2)) == []


def test_errors_from_a_stream_keep_the_renderer_exception_type(client: RenderClient) -> None:
    request = client.renderer("qwen3-template").request([{"role": "user", "content": "hi"}])
    (result,) = client.render_many([request], return_exceptions=True)
    assert isinstance(result, RenderError) and result.error_type == "ValueError"
    with pytest.raises(ValueError, match="role_to_mask is required"):
        build_training_sample(client.renderer("qwen3-template"), [{"role": "user", "content": "hi"}])


def test_render_many_tokens_answers_what_render_does_in_order_with_errors_in_place(client: RenderClient) -> None:
    # A Renders stream: the same engine as render_many, RenderedTokens for samples.
    renderer = client.renderer("qwen3-template")  # a Jinja template that refuses some corpus conversations
    conversations = corpus()[:60]
    batch = [
        renderer.render_request(c["messages"], tools=c.get("tools"), add_generation_prompt=True) for c in conversations
    ]
    streamed = list(client.render_many_tokens(batch, concurrency=8, return_exceptions=True))
    assert len(streamed) == len(batch)
    refused = 0
    for conversation, result in zip(conversations, streamed, strict=True):
        try:
            expected = renderer.render(
                conversation["messages"], tools=conversation.get("tools"), add_generation_prompt=True
            )
        except InvalidArgumentError as exc:
            refused += 1
            assert isinstance(result, InvalidArgumentError) and result.details == exc.details
            continue
        assert result == expected  # renderers.RenderedTokens, all seven fields
    assert 0 < refused < len(batch), "the stream carried both results and per-item errors"
    rendered = next(c for c, result in zip(conversations, streamed, strict=True) if not isinstance(result, RenderError))
    ids = list(client.render_many_tokens([renderer.render_request(rendered["messages"], ids_only=True)]))
    assert ids[0].token_ids == renderer.render_ids(rendered["messages"])


def test_async_render_many_tokens(server: ServerProcess, client: RenderClient) -> None:
    conversations = corpus()[:20]
    expected = [client.renderer("qwen3").render(c["messages"], tools=c.get("tools")) for c in conversations]

    async def run() -> list[object]:
        async with AsyncRenderClient(server.target, timeout=60, connections=2) as async_client:
            renderer = async_client.renderer("qwen3")
            batch = [renderer.render_request(c["messages"], tools=c.get("tools")) for c in conversations]
            return [tokens async for tokens in async_client.render_many_tokens(batch, concurrency=4)]

    assert asyncio.run(run()) == expected
