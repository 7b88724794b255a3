"""How clients open channels to render-service.

Responses carry pixel tensors that can run to hundreds of MiB for a large
image, so the message size limits are lifted on the client side (the server
enforces its own request limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

ChannelOptions = Sequence[tuple[str, Any]]

_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": -1,
    "grpc.max_send_message_length": -1,
}


def channel_options(options: ChannelOptions = (), *, own_connection: bool = False) -> list[tuple[str, Any]]:
    """The default channel options, overridden by `options`.

    `own_connection` gives the channel a connection of its own: by default gRPC
    shares one connection among channels with the same target and options, and
    a server's worker processes (SO_REUSEPORT) are spread per connection.
    """
    merged = dict(_DEFAULT_OPTIONS)
    if own_connection:
        merged["grpc.use_local_subchannel_pool"] = 1
    merged.update(options)
    return list(merged.items())


def open_channels(
    target: str,
    count: int,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> list[grpc.Channel]:
    """`count` blocking channels to `target` ("host:port", "dns:///name:port", ...), one connection each."""
    merged = channel_options(options, own_connection=count > 1)
    if credentials is None:
        return [grpc.insecure_channel(target, options=merged) for _ in range(count)]
    return [grpc.secure_channel(target, credentials, options=merged) for _ in range(count)]


def open_aio_channels(
    target: str,
    count: int,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> list[grpc.aio.Channel]:
    """`count` asyncio channels to `target`, one connection each."""
    merged = channel_options(options, own_connection=count > 1)
    if credentials is None:
        return [grpc.aio.insecure_channel(target, options=merged) for _ in range(count)]
    return [grpc.aio.secure_channel(target, credentials, options=merged) for _ in range(count)]
