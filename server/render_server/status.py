"""What the supervisor tells its other processes: how many workers serve, whether it drains.

Lives in shared memory created before the first fork, so that the HTTP
process's /readyz answers from the supervisor's own view.
"""

from __future__ import annotations

import ctypes
import multiprocessing


class SharedStatus:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._serving = multiprocessing.RawValue(ctypes.c_int, 0)
        self._draining = multiprocessing.RawValue(ctypes.c_bool, False)

    def set_serving(self, count: int) -> None:
        self._serving.value = count

    def start_draining(self) -> None:
        self._draining.value = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready when every worker serves and the server is not draining."""
        if self._draining.value:
            return False, "draining: shutting down"
        serving = self._serving.value
        if serving < self.workers:
            return False, f"not ready: {serving} of {self.workers} workers serving"
        return True, f"ready: {serving} workers serving"
