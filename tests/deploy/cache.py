"""Where the deploy tests keep what is expensive to make: outside the repository, reused across runs.

$RENDER_SERVICE_TEST_CACHE, else $XDG_CACHE_HOME/render-service-test, else ~/.cache/render-service-test.
Everything in it is made by the tests from scratch when missing; deleting it is always safe.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("tests.deploy")


def cache_dir() -> Path:
    configured = os.environ.get("RENDER_SERVICE_TEST_CACHE")
    if configured:
        path = Path(configured)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "render-service-test"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` in the cache, so that two runs don't make the same file at once."""
    with (cache_dir() / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Timings:
    """Seconds per step, logged as each ends and summed up at the end."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        log.info("%s ...", name)
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.steps.append((name, seconds))
            log.info("%s: %.1fs", name, seconds)

    def summary(self) -> str:
        total = sum(seconds for _, seconds in self.steps)
        return f"{total:.0f}s: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.steps)
