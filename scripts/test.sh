#!/usr/bin/env bash
# Set up (if needed) and run every check: generated-code drift, ruff, the type check,
# the test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k parity,
# or scripts/test.sh -m "not server" for the tests that start no server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# The container test (tests/deploy/test_container.py) runs only as root (it skips
# otherwise) and then needs buildah and debootstrap: install them from Debian's packages.
if [ "$(id -u)" -eq 0 ]; then
  for command in buildah debootstrap; do
    if ! PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$command" >/dev/null; then
      echo "test: installing buildah and debootstrap from Debian's packages (apt-get, as root)" \
        "for tests/deploy/test_container.py" >&2
      scripts/install-container-tools.sh
      break
    fi
  done
fi
echo "test: checking generated code, lint, format and types, then running pytest" >&2
.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ -x scripts/typecheck.sh ]; then
  scripts/typecheck.sh
fi
exec .venv/bin/python -m pytest "$@"
