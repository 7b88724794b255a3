"""`python -m render_server.probe`: exit 0 if the local server is healthy.

For container HEALTHCHECKs and scripts that have neither grpc-health-probe nor curl:

    python -m render_server.probe --url http://127.0.0.1:8081/readyz   # the health port: 200 or not
    python -m render_server.probe --address 127.0.0.1:50051            # the gRPC health service

With --url it asks a health path of the server's own (--health-port, answered by
a process that renders never slow, or the HTTP port) and passes on a 200. Without
it, it asks the standard gRPC health service, as grpc-health-probe does, at
127.0.0.1:50051 (render-server's default) or --address; that service is answered by
a worker, so under full load (--max-concurrent-rpcs reached) it can be refused.
Plaintext only.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m render_server.probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="the server's gRPC HOST:PORT, as given to render-server's --host and --port (default: %(default)s)",
    )
    parser.add_argument(
        "--url", help="ask this health URL (e.g. http://127.0.0.1:8081/readyz) instead of the gRPC health service"
    )
    parser.add_argument("--service", default="", help="service to ask about; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.url:
        return _ask_url(args.url, args.timeout)
    with grpc.insecure_channel(args.address) as channel:
        try:
            # types-grpcio-health-checking's HealthStub declares no methods.
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _ask_url(url: str, timeout: float) -> int:
    """0 if GET `url` answers 200; the server's one-line reason is printed either way."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the operator's own URL, from the command line
            print(response.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as exc:  # 503: not ready, draining, a worker silent
        print(f"unhealthy: HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
