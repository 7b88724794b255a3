#!/usr/bin/env bash
# Type-check client/ and server/ with mypy, as configured in pyproject.toml ([tool.mypy]):
# strict for the client packages (render_client, render_wire: they ship py.typed),
# not strict for render_server. Needs the test extra (scripts/setup.sh test).
# Extra arguments go to mypy, e.g. scripts/typecheck.sh --no-incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -m mypy --version >/dev/null 2>&1; then
  echo "scripts/typecheck.sh: mypy is not installed in .venv; run scripts/setup.sh test" >&2
  exit 1
fi
exec .venv/bin/python -m mypy --config-file pyproject.toml "$@"
