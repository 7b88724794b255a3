"""The blocking client, and the drop-in `build_training_sample`.

from render_client import RenderClient, build_training_sample

client = RenderClient("render-service:50051")
renderer = client.renderer("qwen3")          # instead of renderers.create_renderer(...)
sample = build_training_sample(renderer, messages, role_to_mask=lambda m: m["role"] == "assistant")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ._pb import render_pb2 as pb
from ._pb.render_pb2_grpc import RenderServiceStub
from .channel import ChannelOptions, open_channel
from .convert import decode_models, decode_sample, encode_request
from .errors import error_from_rpc
from .types import RenderedTrainingSample, ServerModels

Message = Mapping[str, Any]


class RenderClient:
    """A connection to render-service. Thread-safe; share one per process."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        """`target` is a gRPC target ("host:port"); `timeout` the default deadline per call, in seconds."""
        self._channel = open_channel(target, credentials=credentials, options=options)
        self._stub = RenderServiceStub(self._channel)
        self._timeout = timeout

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer:
        """A handle on a server model, to pass to `build_training_sample`.

        `chat_template_kwargs` plays the part it plays in `renderers.create_renderer`.
        """
        return RemoteRenderer(self, model, dict(chat_template_kwargs) if chat_template_kwargs else None)

    def render_training_sample(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        role_to_mask: Callable[[Message], bool] | None = None,
        tools: Sequence[Any] | None = None,
        content_sft_roles: Iterable[str] | None = None,
        ensure_final_stop: bool = False,
        message_loss_mask: Sequence[bool | int] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> RenderedTrainingSample:
        """`renderers.build_training_sample` on the server's `model`."""
        request = encode_request(
            model,
            messages,
            role_to_mask=role_to_mask,
            tools=tools,
            content_sft_roles=content_sft_roles,
            ensure_final_stop=ensure_final_stop,
            message_loss_mask=message_loss_mask,
            chat_template_kwargs=chat_template_kwargs,
        )
        try:
            response = self._stub.RenderTrainingSample(request, timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return decode_sample(response.sample)

    def list_models(self, *, timeout: float | None = None) -> ServerModels:
        """The models the server has loaded, with library versions and tokenizer fingerprints."""
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return decode_models(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class RemoteRenderer:
    """A server model standing in for a local `renderers.Renderer`."""

    client: RenderClient
    model: str
    chat_template_kwargs: dict[str, Any] | None = None


def build_training_sample(
    renderer: RemoteRenderer,
    messages: Sequence[Message],
    *,
    role_to_mask: Callable[[Message], bool] | None = None,
    tools: Sequence[Any] | None = None,
    content_sft_roles: Iterable[str] | None = None,
    ensure_final_stop: bool = False,
    message_loss_mask: Sequence[bool | int] | None = None,
) -> RenderedTrainingSample:
    """`renderers.build_training_sample`, rendered by the server behind `renderer`.

    Same signature and same result as the in-process call; `role_to_mask` may
    be any callable (the client evaluates it on each message and sends the answers).
    """
    return renderer.client.render_training_sample(
        renderer.model,
        messages,
        role_to_mask=role_to_mask,
        tools=tools,
        content_sft_roles=content_sft_roles,
        ensure_final_stop=ensure_final_stop,
        message_loss_mask=message_loss_mask,
        chat_template_kwargs=renderer.chat_template_kwargs,
    )
