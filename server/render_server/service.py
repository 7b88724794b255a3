"""The gRPC servicer: request -> convert -> render -> convert -> response.

Every answer is either a response or a status from render_client.errors;
anything unexpected is logged here and answered INTERNAL without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NoReturn

import grpc

from render_client._pb import render_pb2 as pb
from render_client._pb import render_pb2_grpc as pb_grpc
from render_client.convert import decode_request, encode_models, encode_sample
from render_client.errors import ERROR_TYPE_KEY, RenderError

from .registry import ModelRegistry
from .rendering import render_sample

log = logging.getLogger(__name__)

# A stream's answer to a batch is sent early once it holds this much.
_RESPONSE_FLUSH_BYTES = 8 * 1024 * 1024


class RenderService(pb_grpc.RenderServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def RenderTrainingSample(
        self, request: pb.RenderTrainingSampleRequest, context: grpc.ServicerContext
    ) -> pb.RenderTrainingSampleResponse:
        response = pb.RenderTrainingSampleResponse()
        try:
            self._render_into(request, response.sample)
        except Exception as exc:
            abort(context, as_render_error(exc))
        return response

    def RenderTrainingSamples(
        self, batches: Iterator[pb.RenderTrainingSamplesRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.RenderTrainingSamplesResponse]:
        index = 0
        for batch in batches:
            response = pb.RenderTrainingSamplesResponse()
            for request in batch.requests:
                result = response.results.add(index=index)
                index += 1
                try:
                    self._render_into(request, result.sample)
                except Exception as exc:
                    error = as_render_error(exc)
                    # Setting the error clears whatever part of the sample was filled.
                    result.error.code = error.code.value[0]
                    result.error.message = error.details
                    result.error.error_type = error.error_type or ""
                if response.ByteSize() >= _RESPONSE_FLUSH_BYTES:
                    yield response  # pixel tensors: do not pile up a batch of them
                    response = pb.RenderTrainingSamplesResponse()
            if response.results:
                yield response

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return encode_models(self._registry.describe())

    def _render_into(self, request: pb.RenderTrainingSampleRequest, out: pb.RenderedTrainingSample) -> None:
        arguments = decode_request(request)
        sample = render_sample(self._registry.get(arguments.model), arguments)
        encode_sample(sample, out)


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
