"""Fixtures for running a client test against both clients: RenderClient and AsyncRenderClient."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.client.clients import AsyncClientInThread, BlockingClient, LoopThread, NewClient, StreamingClient
from tests.support import ServerProcess


@pytest.fixture(params=["RenderClient", "AsyncRenderClient"])
def new_client(request: pytest.FixtureRequest) -> Iterator[NewClient]:
    """Opens clients of the kind under test, `new_client(target, **options)` (RenderClient's
    options), and closes them after the test."""
    loop = LoopThread() if request.param == "AsyncRenderClient" else None
    opened: list[StreamingClient] = []

    def new(target: str, **options: Any) -> StreamingClient:
        client = BlockingClient(target, **options) if loop is None else AsyncClientInThread(loop, target, **options)
        opened.append(client)
        return client

    yield new
    for client in opened:
        client.close()
    if loop is not None:
        loop.stop()


@pytest.fixture
def any_client(server: ServerProcess, new_client: NewClient) -> StreamingClient:
    """A client of the kind under test on the session's server, a connection per worker, as `client`."""
    return new_client(server.target, timeout=120, connections=2)
