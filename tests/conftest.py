from __future__ import annotations

from collections.abc import Iterator

import pytest

from render_client import RenderClient
from tests.support import ServerProcess, running_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One two-worker render-server on the default registry, shared by the whole session."""
    with running_server("--workers", "2") as process:
        yield process
    assert process.process.returncode == 0, process.log()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[RenderClient]:
    """A client with a connection per server worker."""
    with RenderClient(server.target, timeout=120, connections=2) as render_client:
        yield render_client
