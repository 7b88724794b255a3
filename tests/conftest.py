from __future__ import annotations

from collections.abc import Iterator

import pytest

from render_client import RenderClient
from tests.support import ServerProcess, running_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One render-server on the default registry, shared by the whole session."""
    with running_server() as process:
        yield process
    assert process.process.returncode == 0, process.log()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[RenderClient]:
    with RenderClient(server.target, timeout=120) as render_client:
        yield render_client
