"""`python -m tests.renderers_suite [WORKDIR]`: both runs of renderers' tests and the counts."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.renderers_suite import compare
from tests.support import running_server


@contextmanager
def server_target(registry: Path) -> Iterator[str]:
    with running_server("--config", str(registry), "--workers", "1", "--no-http") as server:
        yield server.target


def main() -> int:
    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="renderers-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    comparison = compare(workdir, server_target)
    print(comparison.summary())
    for test, problem in comparison.regressions().items():
        print(f"REMOTE ONLY FAILS {test}: {problem}")
    for test in comparison.misclassified():
        print(f"CLASSIFIED APART {test}")
    print(f"reports: {workdir}")
    return 1 if comparison.regressions() or comparison.misclassified() else 0


if __name__ == "__main__":
    raise SystemExit(main())
