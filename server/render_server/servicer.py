"""The gRPC methods, in a worker's gRPC process: calls go to the render process and back.

Request bytes are handed on unparsed and the render process's answer goes out
as it came (handoff.py), so this process spends no time on protobuf or on
renders: it only moves bytes, which keeps the GIL free for grpcio's own threads.
ListModels is answered here, from the registry this process holds too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from render_client._pb import render_pb2 as pb
from render_client.convert import encode_models
from render_client.errors import ERROR_TYPE_KEY, RenderError

from .handoff import Call, Kind, RenderProcesses, deadline_in
from .metrics import IN_FLIGHT
from .registry import ModelRegistry

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RenderService"].full_name


class RenderServicer:
    def __init__(self, registry: ModelRegistry, renders: RenderProcesses) -> None:
        self._registry = registry
        self._renders = renders

    def _unary(self, kind: Kind, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        """The handler of a unary method whose request the render process answers."""
        in_flight = IN_FLIGHT.labels(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with in_flight.track_inprogress():
                call = self._renders.start(kind, request, deadline=deadline_in(context.time_remaining()))
                _cancel_when_gone(context, call.cancel)
                answer = call.answers.get()
                if answer.code is not grpc.StatusCode.OK:
                    abort(context, answer.error())
                return answer.body

        return handle

    def _stream(self, kind: Kind, method: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        """The handler of a stream of request batches (RenderTrainingSamples, Renders)."""
        in_flight = IN_FLIGHT.labels(method)

        def handle(batches: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            with in_flight.track_inprogress():
                current: Call | None = None  # the batch being rendered

                def cancel() -> None:
                    if current is not None:
                        current.cancel()

                _cancel_when_gone(context, cancel)
                index = 0
                for batch in batches:
                    current = self._renders.start(
                        kind, batch, deadline=deadline_in(context.time_remaining()), first_index=index
                    )
                    if not context.is_active():  # it ended before `cancel` could see this batch
                        current.cancel()
                    for answer in current:
                        if answer.code is not grpc.StatusCode.OK:
                            abort(context, answer.error())
                        if answer.body:
                            yield answer.body
                        if answer.last:
                            index = answer.next_index
                    current = None

        return handle

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return encode_models(self._registry.describe())

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's method handlers.

        The render methods (all but ListModels) take and answer raw bytes: the
        render process parses and serialises them (a request that does not
        parse is its INVALID_ARGUMENT, where gRPC would answer INTERNAL).
        """
        unary = {
            "RenderTrainingSample": Kind.SAMPLE,
            "Render": Kind.RENDER,
            "ParseResponse": Kind.PARSE,
            "BridgeToNextTurn": Kind.BRIDGE,
            "DescribeRenderer": Kind.DESCRIBE,
        }
        return {
            **{
                method: grpc.unary_unary_rpc_method_handler(self._unary(kind, method)) for method, kind in unary.items()
            },
            "RenderTrainingSamples": grpc.stream_stream_rpc_method_handler(
                self._stream(Kind.BATCH, "RenderTrainingSamples")
            ),
            "Renders": grpc.stream_stream_rpc_method_handler(self._stream(Kind.RENDER_BATCH, "Renders")),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=_list_models_request,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        }


def _list_models_request(data: bytes) -> pb.ListModelsRequest:
    # It has no fields to get wrong: bytes that do not parse are ignored, like unknown fields.
    try:
        return pb.ListModelsRequest.FromString(data)
    except DecodeError:
        return pb.ListModelsRequest()


def _cancel_when_gone(context: grpc.ServicerContext, cancel: Callable[[], None]) -> None:
    """Run `cancel` when the call ends: it matters only when that is early (cancelled, past its
    deadline, the server stopping); a call already answered has nothing left to cancel."""
    if not context.add_callback(cancel):
        cancel()  # it has ended already


def abort(context: grpc.ServicerContext, error: RenderError) -> NoReturn:
    """End the call with the error's status and one-line details."""
    if error.error_type:
        context.set_trailing_metadata(((ERROR_TYPE_KEY, error.error_type),))
    context.abort(error.code, error.details)
