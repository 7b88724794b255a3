"""SharedStatus: readiness and liveness from the beats of the supervisor and every worker."""

from __future__ import annotations

import time

import pytest

from render_server import status
from render_server.status import SharedStatus


@pytest.fixture
def serving() -> SharedStatus:
    shared = SharedStatus(workers=2)
    shared.set_serving(2)
    shared.beat_supervisor()
    for slot in range(2):
        shared.beat(slot)
    return shared


def test_every_worker_serving_and_beating_is_ready_and_alive(serving: SharedStatus) -> None:
    assert serving.readiness() == (True, "ready: 2 workers serving")
    assert serving.liveness() == (True, "ok")


def test_a_missing_worker_is_not_ready_but_alive(serving: SharedStatus) -> None:
    serving.set_serving(1)  # the supervisor is forking it again
    assert serving.readiness() == (False, "not ready: 1 of 2 workers serving")
    assert serving.liveness()[0] is True


def test_draining_is_not_ready(serving: SharedStatus) -> None:
    serving.start_draining()
    assert serving.readiness() == (False, "draining: shutting down")
    assert serving.liveness()[0] is True


def test_a_silent_worker_is_unready_then_unhealthy(serving: SharedStatus) -> None:
    now = time.monotonic()
    serving._beats[1] = now - status.UNREADY_AFTER - 1
    assert serving.readiness() == (False, f"not ready: worker 1 silent for over {status.UNREADY_AFTER:.0f}s")
    assert serving.liveness()[0] is True
    serving._beats[1] = now - status.UNHEALTHY_AFTER - 1
    assert serving.liveness() == (False, f"unhealthy: worker 1 silent for over {status.UNHEALTHY_AFTER:.0f}s")
    serving.beat(1)
    assert serving.readiness()[0] is True and serving.liveness()[0] is True


def test_a_silent_supervisor_is_unhealthy(serving: SharedStatus) -> None:
    serving._beats[serving.workers] = time.monotonic() - status.UNHEALTHY_AFTER - 1
    assert serving.liveness() == (False, f"unhealthy: the supervisor silent for over {status.UNHEALTHY_AFTER:.0f}s")
