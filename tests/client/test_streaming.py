"""render_many and the RenderTrainingSamples stream: order, per-item errors, bounded in flight.

The render_many tests run against both clients (`any_client`, `new_client`:
tests/client/conftest.py), the threaded engine and the asyncio one; `client`, a
RenderClient on the same server, is the reference their results are checked
against.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from PIL import Image

from render_client import (
    InvalidArgumentError,
    ModelNotFoundError,
    RenderClient,
    RenderedTrainingSample,
    SampleRequest,
    UnavailableError,
    build_training_sample,
)
from render_client.aio import AsyncRenderClient
from render_wire.errors import RenderError
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from render_wire.requests import encode_request
from tests.client.clients import NewClient, StreamingClient, slow_request, workers_holding_connections
from tests.support import ServerProcess, corpus, running_server

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


def test_results_come_in_input_order_and_match_unary_calls(any_client: StreamingClient, client: RenderClient) -> None:
    batch = requests(client, 120)
    streamed = list(any_client.render_many(batch, concurrency=8))
    assert len(streamed) == len(batch)
    for request, sample in zip(batch, streamed, strict=True):
        assert sample == client.render(request)


def test_a_bad_item_gets_its_own_error_and_the_rest_go_on(any_client: StreamingClient, client: RenderClient) -> None:
    batch = requests(client, 30)
    batch[5] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])  # refused by the server
    batch[9] = SampleRequest("qwen3", BAD_IMAGE)  # refused by the client before sending
    batch[12] = SampleRequest("qwen3", [{"role": "wizard", "content": "x"}])
    results = list(any_client.render_many(batch, concurrency=4, return_exceptions=True))
    assert isinstance(results[5], ModelNotFoundError)
    assert isinstance(results[9], InvalidArgumentError) and "URLs and file paths" in str(results[9])
    assert isinstance(results[12], InvalidArgumentError) and "messages[0].role" in str(results[12])
    good = [i for i in range(30) if i not in (5, 9, 12)]
    for i in good:
        assert results[i] == client.render(batch[i])


def test_without_return_exceptions_the_error_is_raised_at_its_turn(
    any_client: StreamingClient, client: RenderClient
) -> None:
    batch = requests(client, 10)
    batch[6] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])
    taken = []
    with pytest.raises(ModelNotFoundError):
        for sample in any_client.render_many(batch, concurrency=3):
            taken.append(sample)
    assert taken == [client.render(request) for request in batch[:6]]


def test_no_more_than_concurrency_requests_are_taken_ahead(any_client: StreamingClient, client: RenderClient) -> None:
    batch = requests(client, 60)
    pulled = 0

    def counted() -> Iterator[SampleRequest]:
        nonlocal pulled
        for request in batch:
            pulled += 1
            yield request

    consumed = 0
    high_water = 0
    for _ in any_client.render_many(counted(), concurrency=5):
        # Taken from the dataset but not yet handed to us, this one included.
        high_water = max(high_water, pulled - consumed)
        consumed += 1
    assert consumed == 60
    assert high_water <= 5


def test_an_iterable_that_raises_raises_at_its_position(any_client: StreamingClient, client: RenderClient) -> None:
    batch = requests(client, 4)

    def failing() -> Iterator[SampleRequest]:
        yield from batch
        raise RuntimeError("dataset broke")

    taken = []
    with pytest.raises(RuntimeError, match="dataset broke"):
        for sample in any_client.render_many(failing(), concurrency=2):
            taken.append(sample)
    assert taken == [client.render(request) for request in batch]


def test_breaking_out_early_does_not_hang(any_client: StreamingClient, client: RenderClient) -> None:
    for index, _ in enumerate(any_client.render_many(requests(client, 200), concurrency=16)):
        if index == 3:
            break
    # The client stays usable, for calls and streams.
    request = requests(client, 1)[0]
    assert any_client.render(request).token_ids
    assert list(any_client.render_many([request] * 3)) == [client.render(request)] * 3


def test_the_asyncio_client_takes_an_async_iterable(server: ServerProcess, client: RenderClient) -> None:
    batch = requests(client, 40)
    batch[7] = SampleRequest("no-such-model", [{"role": "user", "content": "x"}])

    async def collect() -> list[RenderedTrainingSample | RenderError]:
        async with AsyncRenderClient(server.target, connections=2) as async_client:

            async def produce() -> AsyncIterator[SampleRequest]:
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


def test_render_many_rejects_a_silly_concurrency(any_client: StreamingClient) -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        list(any_client.render_many([], concurrency=0))
    assert list(any_client.render_many([], concurrency=2)) == []


def test_errors_from_a_stream_keep_the_renderer_exception_type(
    any_client: StreamingClient, client: RenderClient
) -> None:
    request = client.renderer("qwen3-template").request([{"role": "user", "content": "hi"}])
    (result,) = any_client.render_many([request], return_exceptions=True)
    assert isinstance(result, InvalidArgumentError) and result.error_type == "ValueError"
    with pytest.raises(ValueError, match="role_to_mask is required"):
        next(iter(any_client.render_many([request])))
    with pytest.raises(ValueError, match="role_to_mask is required"):
        build_training_sample(client.renderer("qwen3-template"), [{"role": "user", "content": "hi"}])


def test_render_many_tokens_answers_what_render_does_in_order_with_errors_in_place(
    any_client: StreamingClient, client: RenderClient
) -> None:
    # A Renders stream: the same engine as render_many, RenderedTokens for samples.
    renderer = client.renderer("qwen3-template")  # a Jinja template that refuses some corpus conversations
    conversations = corpus()[:60]
    batch = [
        renderer.render_request(c["messages"], tools=c.get("tools"), add_generation_prompt=True) for c in conversations
    ]
    streamed = list(any_client.render_many_tokens(batch, concurrency=8, return_exceptions=True))
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
    ids = list(any_client.render_many_tokens([renderer.render_request(rendered["messages"], ids_only=True)]))
    assert ids[0].token_ids == renderer.render_ids(rendered["messages"])


# --- streams that break: a worker killed, a server draining ---------------------------

CONCURRENCY = 8


def text_requests(client: RenderClient) -> tuple[list[SampleRequest], list[RenderedTrainingSample]]:
    """Quick requests (no images) and their samples from `client`, the reference."""
    renderer = client.renderer("qwen3")
    conversations = [c for c in corpus() if "images" not in c["tags"]][:24]
    batch = [renderer.request(c["messages"], tools=c.get("tools")) for c in conversations]
    return batch, [client.render(request) for request in batch]


def test_a_worker_killed_mid_stream_costs_no_request(new_client: NewClient, client: RenderClient) -> None:
    batch, samples = text_requests(client)
    dataset, expected = batch * 10, samples * 10
    with running_server("--workers", "2") as server:
        streams = new_client(server.target, timeout=120, connections=2)
        results: list[RenderedTrainingSample | RenderError] = []
        for result in streams.render_many(dataset, concurrency=CONCURRENCY, return_exceptions=True):
            results.append(result)
            if len(results) == 40:
                # Mid-stream: up to CONCURRENCY requests are in flight, 200 not yet taken.
                # One of the workers our streams are connected to: its stream breaks.
                victims = workers_holding_connections(server)
                assert victims, "no worker holds the client's connections"
                os.kill(victims[0], signal.SIGKILL)
        assert len(results) == len(dataset)
        assert [f"{i}: {r!r}" for i, r in enumerate(results) if isinstance(r, RenderError)] == []
        # Each result is its own request's sample: none lost, none duplicated, none out of place.
        assert results == expected
        # The client goes on: a new stream after the broken one.
        assert list(streams.render_many(batch[:6], concurrency=4)) == samples[:6]
        deadline = time.monotonic() + 30
        while "died: killed by SIGKILL" not in server.log():
            assert time.monotonic() < deadline, "the worker was not killed"
            time.sleep(0.1)


def test_a_draining_server_answers_what_it_took_and_fails_the_rest_unavailable(
    new_client: NewClient, client: RenderClient
) -> None:
    batch, samples = text_requests(client)
    failing = threading.Event()  # the stream has given up: the dataset ends soon after
    taken = 0

    def dataset() -> Iterator[SampleRequest]:
        # Goes on until the stream fails (SIGTERM, then `--grace` seconds, then resends
        # refused), then 20 more for the failed stream to refuse; bounded in case it never does.
        nonlocal taken
        after = 0
        deadline = time.monotonic() + 120
        while after < 20 and time.monotonic() < deadline:
            after += failing.is_set()
            yield batch[taken % len(batch)]
            taken += 1

    with running_server("--workers", "1", "--grace", "3") as server:
        streams = new_client(server.target, timeout=120, connections=2)
        results: list[RenderedTrainingSample | RenderError] = []
        taken_at_sigterm = 0
        for result in streams.render_many(dataset(), concurrency=CONCURRENCY, return_exceptions=True):
            results.append(result)
            if len(results) == 40:
                taken_at_sigterm = taken
                server.process.send_signal(signal.SIGTERM)
            if isinstance(result, RenderError):
                failing.set()
        assert server.process.wait(timeout=60) == 0
    assert len(results) == taken, "every request taken gets a result"
    first_error = next((i for i, r in enumerate(results) if isinstance(r, RenderError)), None)
    assert first_error is not None, "the stream outlived the server"
    # Everything taken before SIGTERM was in flight, and is answered: the drain's grace.
    assert taken_at_sigterm >= 40 and first_error >= taken_at_sigterm
    # Until the stream broke, each result is its request's sample, in order...
    assert results[:first_error] == [samples[i % len(samples)] for i in range(first_error)]
    # ...and after it, errors: only the requests in flight then can come back later (their stream's).
    assert all(isinstance(r, RenderError) for r in results[first_error + CONCURRENCY :])
    # The server refused the resends: the errors say it is unavailable.
    errors = [r for r in results if isinstance(r, RenderError)]
    assert len(errors) >= 20
    assert {type(e) for e in errors} == {UnavailableError}, {f"{type(e).__name__}: {e}" for e in errors}


def test_a_server_lost_before_answering_fails_each_request_instead_of_hanging(new_client: NewClient) -> None:
    # Fewer requests than `concurrency`: all are sent at once, and the streams'
    # request sides closed. Killed outright, the server answers none of the slow
    # ones; the streams are opened again and refused until each request gets its error.
    requests = [slow_request(seed) for seed in range(4)]
    with running_server("--workers", "1") as server:
        streams = new_client(server.target, timeout=120, connections=2)
        streams.step_timeout = 30  # a few resends, a second or two each
        killer = threading.Timer(1.5, server.kill)  # all four sent; a 3000x3000 image renders for seconds
        killer.start()
        results = list(streams.render_many(requests, concurrency=8, return_exceptions=True))
        killer.join()
    assert len(results) == len(requests)
    errors = [r for r in results if isinstance(r, RenderError)]
    assert errors, "the server answered everything before it was killed: the test proved nothing"
    assert {type(e) for e in errors} == {UnavailableError}, {f"{type(e).__name__}: {e}" for e in errors}
    # What was answered before is whole: a sample of its image.
    assert all(r.multi_modal_data is not None for r in results if not isinstance(r, RenderError))
