"""The gRPC methods' side of the hand-over: calls whose caller has left are not rendered; in-flight counts queued calls."""

from __future__ import annotations

import time

import grpc

from render_client._pb import render_pb2 as pb
from render_client._pb.render_pb2_grpc import RenderServiceStub
from tests.server.test_http import get, metric
from tests.support import ServerProcess, slow_request


def text_request() -> pb.RenderTrainingSampleRequest:
    return pb.RenderTrainingSampleRequest(
        model="qwen3", messages=[pb.Message(role="user", text="hi"), pb.Message(role="assistant", text="hello")]
    )


def cancelled_renders(server: ServerProcess) -> float:
    text = get(f"{server.http}/metrics")[1].decode()
    return metric(text, "render_requests_total", method="RenderTrainingSample", model="qwen3", code="CANCELLED")


def test_calls_whose_caller_left_while_queued_are_not_rendered(server: ServerProcess) -> None:
    before = cancelled_renders(server)
    # One channel is one connection, so one worker: the later calls queue behind the slow render.
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = RenderServiceStub(channel)
        slow = stub.RenderTrainingSample.future(slow_request(), timeout=120)
        time.sleep(0.5)
        in_flight_text = stub.RenderTrainingSample.future(text_request(), timeout=120)
        expiring = stub.RenderTrainingSample.future(text_request(), timeout=1.0)
        abandoned = stub.RenderTrainingSample.future(text_request(), timeout=120)
        in_flight = wait_for_in_flight(server, 4)
        abandoned.cancel()
        assert expiring.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert slow.done() is False, "the slow render ended early: the test proved nothing"
        assert slow.result().sample.multi_modal_data.mm_items
        assert list(in_flight_text.result().sample.token_ids)
    assert abandoned.cancelled()
    assert in_flight == 4, "queued calls count as in flight"
    # Both left before their turn came: the render process skipped them.
    deadline = time.monotonic() + 10
    while cancelled_renders(server) - before < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_renders(server) - before == 2


def test_a_stream_cancelled_mid_batch_stops_rendering(server: ServerProcess) -> None:
    text = get(f"{server.http}/metrics")[1].decode()
    before = metric(text, "render_requests_total", method="RenderTrainingSamples", model="qwen3")
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
        # Same connection, same worker: the render process takes this call after the batch.
        assert list(stub.RenderTrainingSample(text_request(), timeout=120).sample.token_ids)
    assert results == []
    text = get(f"{server.http}/metrics")[1].decode()
    rendered = metric(text, "render_requests_total", method="RenderTrainingSamples", model="qwen3") - before
    assert rendered == 0, f"{rendered} items rendered after the stream was cancelled"


def wait_for_in_flight(server: ServerProcess, count: int, method: str = "RenderTrainingSample") -> float:
    """render_requests_in_flight for `method` once it reaches `count` (or what it is after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        text = get(f"{server.http}/metrics")[1].decode()
        in_flight = metric(text, "render_requests_in_flight", method=method)
        if in_flight >= count or time.monotonic() > deadline:
            return in_flight
        time.sleep(0.05)
