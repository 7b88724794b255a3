"""server.py: the gRPC methods' side of the hand-over (calls whose caller has left are not rendered;
in-flight counts queued calls) and server assembly (reflection that resolves method names)."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor_pool

from render_server.limits import Limits
from render_server.server import MethodAwarePool
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.server.test_http import get, metric
from tests.support import ServerProcess, slow_request


def text_request() -> pb.RenderTrainingSampleRequest:
    return pb.RenderTrainingSampleRequest(
        model="qwen3", messages=[pb.Message(role="user", text="hi"), pb.Message(role="assistant", text="hello")]
    )


def skipped_renders(server: ServerProcess) -> tuple[float, float]:
    """How many qwen3 calls the render processes skipped: (caller left, deadline passed)."""
    text = get(f"{server.http}/metrics")[1].decode()
    return tuple(
        metric(text, "render_requests_total", method="RenderTrainingSample", model="qwen3", code=code)
        for code in ("CANCELLED", "DEADLINE_EXCEEDED")
    )


def test_calls_whose_caller_left_while_queued_are_not_rendered(server: ServerProcess) -> None:
    before = skipped_renders(server)
    # One channel is one connection, so one worker; two slow renders hold both its render
    # processes, so the later calls queue behind them.
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = RenderServiceStub(channel)
        slow = [stub.RenderTrainingSample.future(slow_request(), timeout=120) for _ in range(2)]
        time.sleep(0.5)
        in_flight_text = stub.RenderTrainingSample.future(text_request(), timeout=120)
        expiring = stub.RenderTrainingSample.future(text_request(), timeout=1.0)
        abandoned = stub.RenderTrainingSample.future(text_request(), timeout=120)
        in_flight = wait_for_in_flight(server, 5)
        abandoned.cancel()
        assert expiring.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not any(call.done() for call in slow), "a slow render ended early: the test proved nothing"
        assert all(call.result().sample.multi_modal_data.mm_items for call in slow)
        assert list(in_flight_text.result().sample.token_ids)
    assert abandoned.cancelled()
    assert in_flight == 5, "queued calls count as in flight"
    # Both left before their turn came: the render processes skipped them, each with its own status.
    expected = (before[0] + 1, before[1] + 1)
    deadline = time.monotonic() + 10
    while skipped_renders(server) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert skipped_renders(server) == expected


def test_a_stream_cancelled_mid_batch_stops_rendering(server: ServerProcess) -> None:
    text = get(f"{server.http}/metrics")[1].decode()
    before = metric(text, "render_requests_total", method="RenderTrainingSamples", model="qwen3")
    slow_before = metric(text, "render_requests_total", method="RenderTrainingSamples", model="qwen3-vl")
    batch = pb.RenderTrainingSamplesRequest(requests=[slow_request(), *[text_request()] * 50])
    with grpc.insecure_channel(server.target) as channel:
        stub = RenderServiceStub(channel)
        stream = stub.RenderTrainingSamples(iter([batch]), timeout=120)
        wait_for_in_flight(server, 1, method="RenderTrainingSamples")
        time.sleep(0.5)  # the first item is rendering
        stream.cancel()
        results = []
        try:
            for response in stream:
                results.extend(response.results)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED
    assert results == []
    # The render process finishes the slow item it had started, then checks before each next one:
    # had it gone on, items of a few ms each would be counted within the second after.
    wait_for_count(server, "RenderTrainingSamples", "qwen3-vl", slow_before + 1)
    time.sleep(1.0)
    text = get(f"{server.http}/metrics")[1].decode()
    rendered = metric(text, "render_requests_total", method="RenderTrainingSamples", model="qwen3") - before
    assert rendered == 0, f"{rendered} items rendered after the stream was cancelled"


def wait_for_count(server: ServerProcess, method: str, model: str, count: float) -> None:
    """Wait (up to 60 s) until render_requests_total for `method` and `model` reaches `count`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = get(f"{server.http}/metrics")[1].decode()
        if metric(text, "render_requests_total", method=method, model=model) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{method} {model} never reached {count} renders")


def test_small_calls_do_not_wait_behind_a_maximal_legal_request(server: ServerProcess) -> None:
    limits = Limits()
    # The most text the limits let through, made of long space runs so that it also stays under
    # --max-tokens (about 2 tokens per 64 bytes): a render of seconds that is answered.
    unit = "x" + " " * 63
    text = unit * ((limits.max_tokens * limits.max_text_bytes_per_token - 1024) // len(unit))
    largest = pb.RenderTrainingSampleRequest(
        model="qwen3", messages=[pb.Message(role="user", text=text), pb.Message(role="assistant", text="ok")]
    )
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = RenderServiceStub(channel)  # one connection: the worker rendering the large request
        started = time.monotonic()
        large = stub.RenderTrainingSample.future(largest, timeout=120)
        time.sleep(0.3)  # it is rendering
        latencies = []
        for _ in range(10):
            sent = time.monotonic()
            assert list(stub.RenderTrainingSample(text_request(), timeout=60).sample.token_ids)
            latencies.append(time.monotonic() - sent)
        answered_first = large.done()
        tokens = len(large.result().sample.token_ids)
        took = time.monotonic() - started
    assert tokens <= limits.max_tokens
    # With one render process per worker, the first small call would wait for the whole large render.
    assert max(latencies) < took / 4, f"small calls took up to {max(latencies):.2f}s beside a {took:.2f}s render"
    assert not answered_first, "the large request was answered before the small calls: the test proved nothing"


def wait_for_in_flight(server: ServerProcess, count: int, method: str = "RenderTrainingSample") -> float:
    """render_requests_in_flight for `method` once it reaches `count` (or what it is after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        text = get(f"{server.http}/metrics")[1].decode()
        in_flight = metric(text, "render_requests_in_flight", method=method)
        if in_flight >= count or time.monotonic() > deadline:
            return in_flight
        time.sleep(0.05)


def test_reflection_finds_the_file_of_a_method() -> None:
    pool = MethodAwarePool(descriptor_pool.Default())
    assert pool.FindFileContainingSymbol("render.v1.RenderService.RenderTrainingSample") is pb.DESCRIPTOR
    assert pool.FindFileContainingSymbol("render.v1.RenderService") is pb.DESCRIPTOR
    for missing in ("render.v1.RenderService.Nope", "render.v1.Nope.RenderTrainingSample", "nope"):
        with pytest.raises(KeyError):
            pool.FindFileContainingSymbol(missing)
