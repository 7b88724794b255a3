#!/usr/bin/env bash
# Set up (if needed) and start render-server on the embedded default registry.
# Extra arguments go to render-server, e.g. scripts/serve.sh --host 0.0.0.0 --port 50051
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/render-server "$@"
