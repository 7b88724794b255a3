#!/usr/bin/env bash
# Set up render-service in .venv on a fresh machine.
#
#   scripts/setup.sh          the server and client
#   scripts/setup.sh test     ...plus test tools: pytest, ruff, grpcio-tools, and the
#                             Go clients the tests drive the server with (grpcurl, ghz,
#                             grpc-health-probe, and for deploy/k8s kubeconform, kustomize
#                             and kube-score) in .tools/bin; needs Go
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras="server"
[ "${1:-}" = "test" ] && extras="server,test"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"

if [ "${1:-}" = "test" ]; then
  # Pinned versions of real gRPC tools written by others; built from the Go module proxy.
  mkdir -p .tools/bin
  export GOBIN="$PWD/.tools/bin"
  for tool in \
    github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4 \
    github.com/bojand/ghz/cmd/ghz@v0.120.0 \
    github.com/grpc-ecosystem/grpc-health-probe@v0.4.62 \
    github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0 \
    sigs.k8s.io/kustomize/kustomize/v5@v5.8.2 \
    github.com/zegl/kube-score/cmd/kube-score@v1.20.0; do
    name="${tool%@*}"; name="${name%/v[0-9]*}"; name="${name##*/}"  # .../kustomize/v5@... builds `kustomize`
    [ -x ".tools/bin/$name" ] && continue
    if ! command -v go >/dev/null; then
      echo "scripts/setup.sh test: building $name into .tools/bin needs Go 1.26 or newer" \
        "(the 'go' command on PATH): https://go.dev/doc/install" >&2
      exit 1
    fi
    go install "$tool"
  done
fi
