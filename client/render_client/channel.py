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


def channel_options(options: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """The default channel options, overridden by `options`."""
    merged = dict(_DEFAULT_OPTIONS)
    merged.update(options)
    return list(merged.items())


def open_channel(
    target: str, *, credentials: grpc.ChannelCredentials | None = None, options: ChannelOptions = ()
) -> grpc.Channel:
    """A blocking channel to `target` ("host:port", "dns:///name:port", ...)."""
    if credentials is None:
        return grpc.insecure_channel(target, options=channel_options(options))
    return grpc.secure_channel(target, credentials, options=channel_options(options))


def open_aio_channel(
    target: str, *, credentials: grpc.ChannelCredentials | None = None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """An asyncio channel to `target`."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=channel_options(options))
    return grpc.aio.secure_channel(target, credentials, options=channel_options(options))
