#!/usr/bin/env bash
# Load-test render-service with ghz (github.com/bojand/ghz) through server reflection.
#
#   bench/ghz.sh                 start a local server (one worker per core), run 60 s at concurrency 64
#   bench/ghz.sh HOST:PORT       run against a server that is already up
#
# Request data (bench/ghz_data.py): the repository's corpus of conversations
# (tests/fixtures/conversations.jsonl), or the JSONL file CONVERSATIONS names,
# for MODELS (default qwen3,qwen3-vl,deepseek-v4: default-registry ids).
# DURATION, CONCURRENCY and CONNECTIONS override the defaults; calls still in
# flight when the time is up are waited for (--duration-stop wait), not counted
# as errors. Installs ghz (and the rest) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh tools

duration="${DURATION:-60s}"
concurrency="${CONCURRENCY:-64}"
connections="${CONNECTIONS:-$((4 * $(nproc)))}"  # several per worker: each takes whole connections
[ "$connections" -gt "$concurrency" ] && connections="$concurrency"  # ghz refuses more connections than calls
data="$(mktemp -t ghz-requests.XXXXXX.json)"
trap 'rm -f "$data"; [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null; true' EXIT
data_args=(--out "$data" --models "${MODELS:-qwen3,qwen3-vl,deepseek-v4}")
[ -n "${CONVERSATIONS:-}" ] && data_args+=(--conversations "$CONVERSATIONS")
.venv/bin/python -m bench.ghz_data "${data_args[@]}" >&2

target="${1:-}"
if [ -z "$target" ]; then
  log="$(mktemp -t render-server.XXXXXX.log)"
  .venv/bin/render-server --port 0 >"$log" 2>&1 &
  server_pid=$!
  until grep -q "render-server listening on" "$log"; do
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
  done
  target="$(grep -o 'listening on [^ ]*' "$log" | cut -d' ' -f3)"
fi

.tools/bin/ghz --insecure \
  --call render.v1.RenderService.RenderTrainingSample \
  --data-file "$data" --disable-template-data \
  --max-recv-message-size 1GB \
  --concurrency "$concurrency" --connections "$connections" --duration "$duration" --duration-stop wait \
  "$target"
