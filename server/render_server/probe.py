"""`python -m render_server.probe`: exit 0 if the local server reports SERVING.

For container HEALTHCHECKs and scripts that have no grpc-health-probe binary:
it asks the standard gRPC health service, as Kubernetes' gRPC probes do.
It asks 127.0.0.1:50051, render-server's default gRPC address; a server started
with another --host or --port is asked with --address HOST:PORT. Plaintext only.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m render_server.probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="the server's gRPC HOST:PORT, as given to render-server's --host and --port (default: %(default)s)",
    )
    parser.add_argument("--service", default="", help="service to ask about; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
