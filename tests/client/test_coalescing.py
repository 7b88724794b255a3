"""render_client.coalescing against a live server: concurrent calls travel together in Calls batches, and
each call keeps what it has alone: its result, its own error, its deadline, its cancellation.

Every comparison is with the same call sent alone (`coalesce_window=None`: a plain unary call), whose
results tests/test_parity.py and test_protocol_parity.py hold to in-process rendering; those suites
run through the coalesced path too (the default client). Resends of a batch whose worker died are in
tests/server/test_lifecycle.py (its load's calls are coalesced).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc
import pytest
from PIL import Image

from render_client import (
    DeadlineExceededError,
    InvalidArgumentError,
    ModelNotFoundError,
    RenderClient,
    RenderError,
    SampleRequest,
)
from render_client.aio import AsyncRenderClient
from render_client.coalescing import MAX_CALL_BYTES
from render_wire.calls import decode_call_results, encode_calls
from render_wire.requests import encode_parse_request, encode_sample_request
from tests.client.clients import noise_image
from tests.reference import reference_renderer
from tests.support import ServerProcess, corpus

THREADS = 16


def smooth_image(side: int) -> bytes:
    """A large image in a small file (a gradient): a call that takes long and still goes in a batch."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def slow_sample(side: int = 2500) -> SampleRequest:
    return SampleRequest(
        "qwen3-vl",
        [
            {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": smooth_image(side)}]},
            {"role": "assistant", "content": "A gradient."},
        ],
    )  # fmt: skip


def text_conversations() -> list[dict[str, Any]]:
    return [c for c in corpus() if "images" not in c["tags"] and len(c["messages"]) >= 3][:24]


def turns(conversation: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]] | None:
    """Prompt messages, the rest after the first assistant message, and that message's tokens."""
    messages = conversation["messages"]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if not first:
        return None
    return messages[:first], messages[first + 1 :], messages[first : first + 1]


Call = Callable[[RenderClient], Any]


def calls_of_every_kind() -> list[tuple[str, Call]]:
    """Calls of each coalesced method on corpus conversations, qwen3."""
    local = reference_renderer("qwen3")
    made: list[tuple[str, Call]] = []
    for conversation in text_conversations():
        tools = conversation.get("tools")
        split = turns(conversation)
        if split is None:
            continue
        prompt, rest, answer = split
        prompt_ids = local.render_ids(prompt, tools=tools, add_generation_prompt=True)
        full = local.render_ids(prompt + answer, tools=tools)
        completion = full[len(prompt_ids) :]
        messages = conversation["messages"]

        def sample(client: RenderClient, messages: Any = messages, tools: Any = tools) -> Any:
            return client.render(client.renderer("qwen3").request(messages, tools=tools))

        made += [
            ("render", lambda c, m=prompt, t=tools: c.renderer("qwen3").render(m, tools=t, add_generation_prompt=True)),
            ("render_ids", lambda c, m=messages, t=tools: c.renderer("qwen3").render_ids(m, tools=t)),
            ("parse", lambda c, i=completion, t=tools, p=prompt_ids: c.renderer("qwen3").parse_response(i, tools=t, prompt_ids=p)),
            ("sample", sample),
        ]  # fmt: skip
        if rest:
            made.append(
                ("bridge", lambda c, p=prompt_ids, i=completion, r=rest, t=tools: c.renderer("qwen3").bridge_to_next_turn(p, i, r, tools=t))
            )  # fmt: skip
    return made


def outcome(call: Call, client: RenderClient) -> Any:
    try:
        return call(client)
    except RenderError as error:
        return (type(error).__mro__[:2], error.details, error.error_type)


@pytest.fixture(scope="module")
def alone(server: ServerProcess) -> Iterator[RenderClient]:
    """A client sending every call on its own: plain unary calls."""
    with RenderClient(server.target, timeout=120, connections=2, coalesce_window=None, image_memory_mb=0) as client:
        yield client


def test_concurrent_calls_of_every_kind_travel_together_and_are_answered_as_alone(
    server: ServerProcess, alone: RenderClient
) -> None:
    work = calls_of_every_kind()
    assert {kind for kind, _ in work} == {"render", "render_ids", "parse", "sample", "bridge"}
    expected = [outcome(call, alone) for _, call in work]
    with RenderClient(server.target, timeout=120, connections=2) as client:
        client.renderer("qwen3")  # asks ListModels once, before the threads start
        with ThreadPoolExecutor(THREADS) as threads:
            got = list(threads.map(lambda call: outcome(call, client), [call for _, call in work]))
        coalescer = client._in_this_process.coalescer
        assert coalescer is not None and coalescer.calls_sent > len(work) / 2, "the calls went alone"
        assert coalescer.batches_sent < coalescer.calls_sent / 2, "the calls went in batches of one"
    differing = [kind for (kind, _), want, have in zip(work, expected, got, strict=True) if want != have]
    assert differing == []


def test_each_call_of_a_batch_keeps_its_own_error(server: ServerProcess, alone: RenderClient) -> None:
    good = {"role": "user", "content": "Hello."}
    bad_role = {"role": "robot", "content": "beep"}
    requests = [
        SampleRequest("qwen3", [good, {"role": "assistant", "content": "Hi."}]),
        SampleRequest("nope", [good]),
        SampleRequest("qwen3", [good, bad_role]),
        SampleRequest("qwen3-vl", [{"role": "user", "content": [{"type": "video", "video": b"\x00\x00"}]}]),
        SampleRequest("qwen3", [good]),
    ]
    expected = [outcome(lambda c, r=request: c.render(r), alone) for request in requests]
    assert [type(e) for e in expected] == [type(expected[0]), tuple, tuple, tuple, type(expected[0])]
    with RenderClient(server.target, timeout=120, coalesce_window=0.2) as client, ThreadPoolExecutor(8) as threads:
        busy = threads.submit(client.render, slow_sample())  # goes alone: the others gather meanwhile
        time.sleep(0.05)
        got = list(threads.map(lambda r: outcome(lambda c: c.render(r), client), requests))
        busy.result(timeout=120)
        coalescer = client._in_this_process.coalescer
        assert coalescer is not None and (coalescer.batches_sent, coalescer.calls_sent) == (1, len(requests))
        with pytest.raises(ModelNotFoundError) as raised:
            client.render(requests[1])
    assert got == expected
    status = raised.value.rpc_error  # as a unary call's: its status and details
    assert isinstance(status, grpc.RpcError) and status.code() is grpc.StatusCode.NOT_FOUND


def test_a_call_keeps_its_own_deadline_in_a_batch(server: ServerProcess) -> None:
    quick = SampleRequest("qwen3", [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}])
    with RenderClient(server.target, timeout=120, coalesce_window=0.1) as client, ThreadPoolExecutor(2) as threads:
        slow, other = slow_sample(2500), slow_sample(2400)  # two images: neither waits for the other's
        first = threads.submit(client.render, slow)  # goes alone, the server idle
        time.sleep(0.02)
        rendered = threads.submit(client.render, other)  # opens a batch
        time.sleep(0.02)  # joins that batch, behind a slow call
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.render(quick, timeout=0.25)
        assert time.monotonic() - started < 5  # it did not wait for its batch
        for slow in (first, rendered):
            assert slow.result(timeout=120).multi_modal_data is not None
        coalescer = client._in_this_process.coalescer
        assert coalescer is not None and (coalescer.batches_sent, coalescer.calls_sent) == (1, 2)


def test_the_server_skips_a_call_of_a_batch_whose_time_is_up(server: ServerProcess) -> None:
    slow = encode_sample_request(slow_sample())
    parse = encode_parse_request("qwen3", [1, 2, 3], tools=None, prompt_ids=None, chat_template_kwargs=None)
    batch = encode_calls(
        [
            ("RenderTrainingSample", slow.SerializeToString(), None),
            ("ParseResponse", parse.SerializeToString(), 0.001),  # its time is up behind the image
            ("ParseResponse", parse.SerializeToString(), 60.0),
        ]
    )
    options = [("grpc.max_receive_message_length", -1)]  # the image's tensors
    with grpc.insecure_channel(server.target, options=options) as channel:
        answer = channel.unary_unary("/render.v1.RenderService/Calls")(batch, timeout=120)
    results = decode_call_results(answer, ["RenderTrainingSample", "ParseResponse", "ParseResponse"])
    assert not isinstance(results[0], RenderError) and not isinstance(results[2], RenderError)
    assert isinstance(results[1], DeadlineExceededError)


def test_a_request_too_large_for_a_batch_goes_alone(server: ServerProcess, alone: RenderClient) -> None:
    text = "word " * (MAX_CALL_BYTES // 5 + 1000)
    request = SampleRequest("qwen3", [{"role": "user", "content": text}, {"role": "assistant", "content": "Ok."}])
    with RenderClient(server.target, timeout=120) as client:
        assert client.render(request).token_ids == alone.render(request).token_ids
        coalescer = client._in_this_process.coalescer
        assert coalescer is not None and coalescer.calls_sent == 0


def test_a_server_without_calls_gets_plain_calls(server: ServerProcess, alone: RenderClient) -> None:
    # A real gRPC server in front of the service that forwards every method but Calls, as a server
    # from before Calls would answer: UNIMPLEMENTED.
    with (
        grpc.insecure_channel(server.target) as upstream,
        forwarding_all_but_calls(upstream) as target,
        RenderClient(target, timeout=120) as client,
    ):
        renderer = client.renderer("qwen3")
        messages = text_conversations()[0]["messages"]
        with ThreadPoolExecutor(4) as threads:
            got = list(threads.map(lambda _: renderer.render_ids(messages), range(8)))
        coalescer = client._in_this_process.coalescer
        assert coalescer is not None and not coalescer.supported
        assert got == [alone.renderer("qwen3").render_ids(messages)] * 8


class forwarding_all_but_calls:
    """A gRPC server on loopback forwarding the render service's methods (not Calls) to `upstream`."""

    def __init__(self, upstream: grpc.Channel) -> None:
        self._upstream = upstream

    def __enter__(self) -> str:
        def forward(method: str) -> grpc.RpcMethodHandler:
            call = self._upstream.unary_unary(f"/render.v1.RenderService/{method}")

            def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    return call(request, timeout=context.time_remaining())  # type: ignore[no-any-return]
                except grpc.RpcError as error:
                    context.abort(error.code(), error.details())

            return grpc.unary_unary_rpc_method_handler(handle)

        methods = (
            "ListModels",
            "DescribeRenderer",
            "RenderTrainingSample",
            "Render",
            "ParseResponse",
            "BridgeToNextTurn",
        )
        self._server = grpc.server(ThreadPoolExecutor(8))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("render.v1.RenderService", {m: forward(m) for m in methods}),)
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(None)


def test_the_asyncio_clients_tasks_are_coalesced_cancelled_and_timed_out(
    server: ServerProcess, alone: RenderClient
) -> None:
    requests = [SampleRequest("qwen3", c["messages"], tools=c.get("tools")) for c in text_conversations()]
    expected = [alone.render(request).token_ids for request in requests]

    async def run() -> None:
        async with AsyncRenderClient(server.target, timeout=120, connections=2) as client:
            got = await asyncio.gather(*(client.render(request) for request in requests))
            assert [sample.token_ids for sample in got] == expected
            coalescer = client._coalescer
            assert coalescer is not None and coalescer.calls_sent == len(requests) - 1  # the first went alone
            assert coalescer.batches_sent < len(requests) / 2
            # A call cancelled before its batch goes leaves it: it is never sent.
            busy = asyncio.ensure_future(client.render(requests[1]))  # goes alone; the next gathers
            cancelled = asyncio.ensure_future(client.render(requests[0]))
            await asyncio.sleep(0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await busy
            await asyncio.sleep(0.05)
            assert coalescer.calls_sent == len(requests) - 1
            with pytest.raises(DeadlineExceededError):
                await client.render(requests[0], timeout=0.0005)

    asyncio.run(run())


def test_closing_the_client_ends_its_waiting_calls(server: ServerProcess) -> None:
    slow = SampleRequest(
        "qwen3-vl",
        [{"role": "user", "content": [{"type": "image", "image": noise_image(2500, 5)}]}],
    )
    client = RenderClient(server.target, timeout=120)
    with ThreadPoolExecutor(1) as threads:
        rendering = threads.submit(client.render, slow)
        time.sleep(0.5)
        client.close()
        try:
            rendering.result(timeout=60)
        except RenderError:
            pass
        except FutureTimeout:
            pytest.fail("a call in flight did not end when its client closed")


@pytest.mark.parametrize("window", [-0.001, float("nan")])
def test_a_silly_window_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="coalesce_window"):
        RenderClient("127.0.0.1:1", coalesce_window=window)
    with pytest.raises(ValueError, match="image_memory_mb"):
        RenderClient("127.0.0.1:1", image_memory_mb=window)


def test_requests_refused_before_sending_are_refused_as_alone(server: ServerProcess) -> None:
    with RenderClient(server.target, timeout=120) as client, pytest.raises(InvalidArgumentError, match="messages"):
        client.renderer("qwen3").render("not a list")  # type: ignore[arg-type]
    assert threading.active_count() < 100  # no thread left waiting for a batch


def test_the_asyncio_renderers_calls_are_coalesced_and_answered_as_alone(
    server: ServerProcess, alone: RenderClient
) -> None:
    # AsyncRenderClient.renderer(model): renderers' protocol awaited, as an asyncio env server calls it.
    local = reference_renderer("qwen3")
    work: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for conversation in text_conversations():
        split = turns(conversation)
        if split is None:
            continue
        prompt, rest, answer = split
        tools = conversation.get("tools")
        prompt_ids = local.render_ids(prompt, tools=tools, add_generation_prompt=True)
        completion = local.render_ids(prompt + answer, tools=tools)[len(prompt_ids) :]
        work.append(("render", (prompt,), {"tools": tools, "add_generation_prompt": True}))
        work.append(("render_ids", (conversation["messages"],), {"tools": tools}))
        work.append(("parse_response", (completion,), {"tools": tools, "prompt_ids": prompt_ids}))
        if rest:
            work.append(("bridge_to_next_turn", (prompt_ids, completion, rest), {"tools": tools}))
    plain = alone.renderer("qwen3")
    expected = [getattr(plain, method)(*args, **kwargs) for method, args, kwargs in work]

    async def run() -> tuple[list[Any], int, int]:
        async with AsyncRenderClient(server.target, timeout=120) as client:
            renderer = client.renderer("qwen3")
            got = await asyncio.gather(*(getattr(renderer, method)(*args, **kwargs) for method, args, kwargs in work))
            coalescer = client._coalescer
            assert coalescer is not None
            return list(got), coalescer.batches_sent, coalescer.calls_sent

    got, batches, calls = asyncio.run(run())
    assert got == expected
    assert calls >= len(work) - 1 and batches < calls / 4, (batches, calls)


def test_asyncio_tasks_calling_in_turn_keep_in_step(server: ServerProcess) -> None:
    # An env server's tasks: each makes its next call as soon as its last is answered. The task whose
    # first call went alone must not stay out of step, racing through calls in batches of one beside
    # everyone else's batch (coalescing.STRAGGLER_SHARE): each task's calls are answered in step.
    local = reference_renderer("qwen3")
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt_ids = local.render_ids(prompt, add_generation_prompt=True)
    completion = local.render_ids([*prompt, {"role": "assistant", "content": "4."}])[len(prompt_ids) :]
    expected = local.parse_response(completion, prompt_ids=prompt_ids)
    tasks, calls_each = 64, 12
    answered = [0]
    finished_at: list[int] = []  # how many calls of all tasks were answered when each task was done

    async def run() -> tuple[int, int]:
        async with AsyncRenderClient(server.target, timeout=120) as client:
            renderer = client.renderer("qwen3")

            async def task() -> None:
                for _ in range(calls_each):
                    assert await renderer.parse_response(completion, prompt_ids=prompt_ids) == expected
                    answered[0] += 1
                finished_at.append(answered[0])

            await asyncio.gather(*(task() for _ in range(tasks)))
            coalescer = client._coalescer
            assert coalescer is not None
            return coalescer.batches_sent, coalescer.calls_sent

    batches, calls = asyncio.run(run())
    assert calls >= tasks * calls_each - calls_each  # at most one task's calls went alone
    assert calls / batches >= 16, f"{calls} calls in {batches} batches"
    assert min(finished_at) > tasks * calls_each // 2, sorted(finished_at)[:4]


def test_asyncio_quick_calls_do_not_wait_out_a_slow_batch(server: ServerProcess) -> None:
    # A small batch beside a large one in flight waits for it only a few windows
    # (coalescing.STRAGGLER_HOLD_WINDOWS): quick calls are answered while slow renders are still out.
    local = reference_renderer("qwen3")
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt_ids = local.render_ids(prompt, add_generation_prompt=True)
    completion = local.render_ids([*prompt, {"role": "assistant", "content": "4."}])[len(prompt_ids) :]
    expected = local.parse_response(completion, prompt_ids=prompt_ids)

    async def run() -> None:
        async with AsyncRenderClient(server.target, timeout=120) as client:
            # Distinct images (none waits for another's); the first goes alone, the others in one batch.
            slow = [asyncio.ensure_future(client.render(slow_sample(2500 - side))) for side in range(12)]
            await asyncio.sleep(0.05)
            renderer = client.renderer("qwen3")
            for _ in range(3):
                assert await renderer.parse_response(completion, prompt_ids=prompt_ids) == expected
            assert not all(call.done() for call in slow), "the quick calls waited for the slow batch"
            await asyncio.gather(*slow)

    asyncio.run(run())
