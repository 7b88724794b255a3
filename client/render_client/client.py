"""The blocking client, and the drop-in `build_training_sample`.

from render_client import RenderClient, build_training_sample

client = RenderClient("render-service:50051")
renderer = client.renderer("qwen3")          # instead of renderers.create_renderer(...)
sample = build_training_sample(renderer, messages, role_to_mask=lambda m: m["role"] == "assistant")

# A whole dataset, in order, with a bounded number in flight:
requests = (renderer.request(row["messages"], tools=row.get("tools")) for row in dataset)
for sample in client.render_many(requests, concurrency=32):
    ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from ._pb import render_pb2 as pb
from .channel import ChannelOptions, Connection, deadline_for, remaining
from .convert import decode_models, decode_response, encode_sample_request
from .errors import RenderError, error_from_rpc
from .streaming import render_many
from .types import RemoteRenderer, RenderedTrainingSample, SampleRequest, ServerModels

Message = Mapping[str, Any]


class RenderClient:
    """A connection to render-service. Thread-safe; share one per process."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        connections: int = 1,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        """Connect to `target`: a gRPC target ("host:port", "dns:///name:port"), or a list
        of "ip:port" addresses to spread calls over (round_robin).

        `timeout` is the default deadline of a unary call, in seconds.
        `connections` opens that many HTTP/2 connections and spreads calls over
        them: a server's worker processes each take whole connections, which the
        kernel assigns at random, so a client that alone should keep a server busy
        wants several per server core (4 x workers spreads well).
        `token` is sent as `authorization: Bearer <token>` on every call;
        `credentials` (e.g. `channel.tls_credentials(...)`) turns on TLS.
        Calls that fail UNAVAILABLE are retried with backoff (channel.py).
        """
        self._connection = Connection(
            target, connections=connections, token=token, credentials=credentials, options=options, asyncio=False
        )
        self._timeout = timeout

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer:
        """A handle on a server model, to pass to `build_training_sample`.

        `chat_template_kwargs` plays the part it plays in `renderers.create_renderer`.
        """
        return RemoteRenderer(self, model, dict(chat_template_kwargs) if chat_template_kwargs else None)

    def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample:
        """One build_training_sample call on the server (RenderTrainingSample)."""
        encoded = encode_sample_request(request)
        deadline = deadline_for(timeout or self._timeout)
        attempt = 0
        while True:
            try:
                response = self._connection.next_stub().RenderTrainingSample(
                    encoded, timeout=remaining(deadline), metadata=self._connection.metadata
                )
                return decode_response(response)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            delay = self._connection.resend_delay(error, attempt, deadline)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def render_many(
        self,
        requests: Iterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[RenderedTrainingSample | RenderError]:
        """Render every request, yielding results in input order, at most `concurrency` in flight.

        Requests go over RenderTrainingSamples streams, one per connection. A
        request that fails raises its RenderError when its turn comes (ending
        the iteration), or with `return_exceptions` is yielded in its place.
        `timeout` bounds the whole iteration; by default it has none.
        """
        return render_many(
            self._connection.stubs,
            requests,
            concurrency=concurrency,
            timeout=timeout,
            metadata=self._connection.metadata,
            return_exceptions=return_exceptions,
        )

    def list_models(self, *, timeout: float | None = None) -> ServerModels:
        """The models the server has loaded, with library versions and tokenizer fingerprints."""
        try:
            response = self._connection.next_stub().ListModels(
                pb.ListModelsRequest(), timeout=timeout or self._timeout, metadata=self._connection.metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return decode_models(response)

    def close(self) -> None:
        self._connection.closed = True
        for channel in self._connection.channels:
            channel.close()

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    request = renderer.request(
        messages,
        role_to_mask=role_to_mask,
        tools=tools,
        content_sft_roles=content_sft_roles,
        ensure_final_stop=ensure_final_stop,
        message_loss_mask=message_loss_mask,
    )
    return renderer.client.render(request)
