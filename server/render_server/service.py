"""The render service: request -> convert -> render -> convert -> response.

`RenderService.render` is the one path every render takes, whatever it
came by (unary call, stream item, HTTP POST): limits, metrics and error
handling live there. Every answer is a response or a status from
render_client.errors; anything unexpected is logged here and answered
INTERNAL, without a traceback on the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from render_client._pb import render_pb2 as pb
from render_client.convert import decode_request, encode_models, encode_response, encode_result, encode_sample
from render_client.errors import ERROR_TYPE_KEY, InvalidArgumentError, RenderError
from render_client.wire import WireMessage

from .limits import Limits, check_request
from .metrics import IMAGES, IN_FLIGHT, LATENCY, REQUESTS, TOKENS, UNKNOWN_MODEL
from .registry import ModelRegistry
from .rendering import render_sample

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RenderService"].full_name
# A stream's answer to a batch is sent early once it holds this much.
_RESPONSE_FLUSH_BYTES = 8 * 1024 * 1024


class Malformed:
    """What a request deserializes to when its bytes are not the message they should be."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type


class RenderService:
    def __init__(self, registry: ModelRegistry, limits: Limits) -> None:
        self._registry = registry
        self._limits = limits

    # -- the one render path --------------------------------------------------

    def render(
        self,
        request: pb.RenderTrainingSampleRequest,
        *,
        method: str,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> WireMessage:
        """`request`'s sample as a RenderedTrainingSample message, or raise the RenderError to answer with."""
        started = time.perf_counter()
        model_label, code = UNKNOWN_MODEL, grpc.StatusCode.OK
        in_flight = IN_FLIGHT.labels(method)
        in_flight.inc()
        try:
            arguments = decode_request(request)
            model = self._registry.get(arguments.model)
            model_label = model.info.id
            check_request(arguments, self._limits)
            sample = render_sample(model, arguments, self._limits, is_cancelled)
            encoded = encode_sample(sample)
            TOKENS.labels(model_label).inc(len(sample.token_ids))
            if model.accepts_images:
                IMAGES.labels(model_label).inc(sum(ref.kind == "image" for ref in arguments.media))
            return encoded
        except Exception as exc:
            error = as_render_error(exc)
            code = error.code
            raise error from None
        finally:
            in_flight.dec()
            REQUESTS.labels(method, model_label, code.name).inc()
            LATENCY.labels(method, model_label).observe(time.perf_counter() - started)

    # -- gRPC methods ------------------------------------------------------------

    def RenderTrainingSample(
        self, request: pb.RenderTrainingSampleRequest | Malformed, context: grpc.ServicerContext
    ) -> bytes:
        try:
            sample = self.render(_well_formed(request), method="RenderTrainingSample", is_cancelled=_gone(context))
        except RenderError as exc:
            abort(context, exc)
        return encode_response(sample)

    def RenderTrainingSamples(
        self, batches: Iterator[pb.RenderTrainingSamplesRequest | Malformed], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        index = 0
        is_cancelled = _gone(context)
        for batch in batches:
            if isinstance(batch, Malformed):
                # Its requests cannot be counted, so no later index would be right.
                abort(context, InvalidArgumentError(f"request batch after index {index}: {_malformed(batch)}"))
            response = WireMessage()  # a RenderTrainingSamplesResponse
            for request in batch.requests:
                if is_cancelled():
                    return
                outcome: WireMessage | RenderError
                try:
                    outcome = self.render(request, method="RenderTrainingSamples", is_cancelled=is_cancelled)
                except RenderError as error:
                    outcome = error
                response.extend(encode_result(index, outcome))
                index += 1
                if response.size >= _RESPONSE_FLUSH_BYTES:
                    yield response.join()  # pixel tensors: do not pile up a batch of them
                    response = WireMessage()
            if response.pieces:
                yield response.join()

    def ListModels(
        self, request: pb.ListModelsRequest | Malformed, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return encode_models(self._registry.describe())

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's method handlers, with deserializers that do not fail on bad bytes.

        gRPC would answer a request that does not parse with INTERNAL; parsing
        leniently lets the handler answer INVALID_ARGUMENT instead. The render
        methods answer with bytes they serialised themselves (convert.encode_response
        and encode_result, around encode_sample's pieces).
        """
        return {
            "RenderTrainingSample": grpc.unary_unary_rpc_method_handler(
                self.RenderTrainingSample,
                request_deserializer=_lenient(pb.RenderTrainingSampleRequest),
            ),
            "RenderTrainingSamples": grpc.stream_stream_rpc_method_handler(
                self.RenderTrainingSamples,
                request_deserializer=_lenient(pb.RenderTrainingSamplesRequest),
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=_lenient(pb.ListModelsRequest),
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        }


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return Malformed(message_class.DESCRIPTOR.full_name)

    return parse


def _malformed(request: Malformed) -> str:
    return f"not a valid {request.message_type} protobuf message"


def _well_formed(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise InvalidArgumentError(f"request: {_malformed(request)}")
    return request


def _gone(context: grpc.ServicerContext) -> Callable[[], bool]:
    """Whether the caller has cancelled or run out of time."""

    def is_cancelled() -> bool:
        remaining = context.time_remaining()
        return not context.is_active() or (remaining is not None and remaining <= 0)

    return is_cancelled


def as_render_error(exc: Exception) -> RenderError:
    """The status to answer `exc` with; unexpected exceptions are logged and INTERNAL."""
    if isinstance(exc, RenderError):
        return exc
    log.exception("unexpected error rendering a request")
    return RenderError("internal error; the server log has the details")


def abort(context: grpc.ServicerContext, error: RenderError) -> NoReturn:
    """End the call with the error's status and one-line details."""
    if error.error_type:
        context.set_trailing_metadata(((ERROR_TYPE_KEY, error.error_type),))
    context.abort(error.code, error.details)
