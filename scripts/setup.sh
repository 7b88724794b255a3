#!/usr/bin/env bash
# Set up render-service in .venv on a fresh machine; prints a line per step.
#
#   scripts/setup.sh          the server and client
#   scripts/setup.sh tools    ...plus the gRPC tools the docs' examples use (grpcurl, ghz,
#                             grpc-health-probe) in .tools/bin; needs Go
#   scripts/setup.sh test     ...plus test tools: pytest, ruff, mypy, grpcio-tools, and the Go
#                             tools the tests drive the server with (the above, and for
#                             deploy/k8s kubeconform, kustomize and kube-score)
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  "" | tools | test) ;;
  *) echo "usage: scripts/setup.sh [tools|test]" >&2; exit 2 ;;
esac
step() { echo "setup: $*" >&2; }

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
fi
extras="server"
[ "$mode" = "test" ] && extras="server,test"
# pip runs only when what it would install changed since the last run that succeeded.
stamp=".venv/.render-service-installed"
wanted="$extras $(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  step "installing render-service[$extras] and its pinned dependencies into .venv (pip; a minute or two on a fresh machine)"
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on -c constraints.txt -e ".[$extras]" |
    { grep -v '^Requirement already satisfied' || true; }
  echo "$wanted" >"$stamp"
else
  step ".venv is up to date"
fi

if [ -n "$mode" ]; then
  # Pinned versions of real gRPC tools written by others, built from the Go module proxy.
  tools=(
    github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4
    github.com/bojand/ghz/cmd/ghz@v0.120.0
    github.com/grpc-ecosystem/grpc-health-probe@v0.4.62
  )
  [ "$mode" = "test" ] && tools+=(
    github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
    sigs.k8s.io/kustomize/kustomize/v5@v5.8.2
    github.com/zegl/kube-score/cmd/kube-score@v1.20.0
  )
  mkdir -p .tools/bin
  export GOBIN="$PWD/.tools/bin"
  for tool in "${tools[@]}"; do
    name="${tool%@*}"; name="${name%/v[0-9]*}"; name="${name##*/}"  # .../kustomize/v5@... builds `kustomize`
    [ -x ".tools/bin/$name" ] && continue
    if ! command -v go >/dev/null; then
      echo "scripts/setup.sh $mode: building $name into .tools/bin needs Go 1.26 or newer" \
        "(the 'go' command on PATH): https://go.dev/doc/install" >&2
      exit 1
    fi
    step "building $name (${tool#*@}) into .tools/bin with go install"
    go install "$tool"
  done
fi
