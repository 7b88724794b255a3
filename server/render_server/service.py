"""The gRPC servicer: request -> convert -> render -> convert -> response.

Every answer is either a response or a status from render_client.errors;
anything unexpected is logged here and answered INTERNAL without a traceback.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from render_client._pb import render_pb2 as pb
from render_client._pb import render_pb2_grpc as pb_grpc
from render_client.convert import decode_request, encode_models, encode_sample
from render_client.errors import ERROR_TYPE_KEY, RenderError

from .registry import ModelRegistry
from .rendering import render_sample

log = logging.getLogger(__name__)


class RenderService(pb_grpc.RenderServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def RenderTrainingSample(
        self, request: pb.RenderTrainingSampleRequest, context: grpc.ServicerContext
    ) -> pb.RenderTrainingSampleResponse:
        try:
            arguments = decode_request(request)
            sample = render_sample(self._registry.get(arguments.model), arguments)
            response = pb.RenderTrainingSampleResponse()
            encode_sample(sample, response.sample)
            return response
        except RenderError as exc:
            abort(context, exc)
        except Exception:
            log.exception("RenderTrainingSample failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return encode_models(self._registry.describe())


def abort(context: grpc.ServicerContext, error: RenderError) -> NoReturn:
    """End the call with the error's status and one-line details."""
    if error.error_type:
        context.set_trailing_metadata(((ERROR_TYPE_KEY, error.error_type),))
    context.abort(error.code, error.details)
