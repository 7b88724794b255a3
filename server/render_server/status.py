"""What the supervisor and its workers tell the HTTP process: who serves, who is alive, whether it drains.

Lives in shared memory created before the first fork, so that the HTTP
process's /readyz and /healthz answer from every process's own word, without
asking any of them: health never waits behind a render or a stream.

Each worker's gRPC process beats (`beat`) from a thread of its own, which no
call ever holds, and the supervisor beats from its watch loop. A worker that
stops beating (stopped, or its interpreter stuck) makes the pod unready at once
and unhealthy if it stays silent, however busy the others are; a busy worker
still beats.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import time

BEAT_INTERVAL = 1.0  # seconds between a process's beats
# A worker silent this long makes the pod unready (its calls may hang), and this long unhealthy (restart it).
UNREADY_AFTER = 10.0
UNHEALTHY_AFTER = 60.0


class SharedStatus:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._serving = multiprocessing.RawValue(ctypes.c_int, 0)
        self._draining = multiprocessing.RawValue(ctypes.c_bool, False)
        # time.monotonic() of each worker's last beat (one clock for every process), then the supervisor's.
        self._beats = multiprocessing.RawArray(ctypes.c_double, workers + 1)

    def set_serving(self, count: int) -> None:
        self._serving.value = count

    def start_draining(self) -> None:
        self._draining.value = True

    def beat(self, slot: int) -> None:
        """Say that worker `slot` is alive now."""
        self._beats[slot] = time.monotonic()

    def beat_supervisor(self) -> None:
        self._beats[self.workers] = time.monotonic()

    def _silent(self, after: float) -> list[int]:
        now = time.monotonic()
        return [slot for slot in range(self.workers) if now - self._beats[slot] > after]

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready when every worker serves and beats, and the server is not draining."""
        if self._draining.value:
            return False, "draining: shutting down"
        serving = self._serving.value
        if serving < self.workers:
            return False, f"not ready: {serving} of {self.workers} workers serving"
        silent = self._silent(UNREADY_AFTER)
        if silent:
            return False, f"not ready: worker {_names(silent)} silent for over {UNREADY_AFTER:.0f}s"
        return True, f"ready: {serving} workers serving"

    def liveness(self) -> tuple[bool, str]:
        """(alive, why): the supervisor watches its children, and no worker has been silent for long."""
        if time.monotonic() - self._beats[self.workers] > UNHEALTHY_AFTER:
            return False, f"unhealthy: the supervisor silent for over {UNHEALTHY_AFTER:.0f}s"
        silent = self._silent(UNHEALTHY_AFTER) if self._serving.value >= self.workers else []
        if silent:
            return False, f"unhealthy: worker {_names(silent)} silent for over {UNHEALTHY_AFTER:.0f}s"
        return True, "ok"


def _names(slots: list[int]) -> str:
    return ", ".join(str(slot) for slot in slots)
