"""One gRPC server: the render service, standard health checking and reflection,
with optional TLS / mutual TLS and bearer-token authentication. It runs in a
worker's gRPC process and hands renders to the worker's render process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import AuthInterceptor, TokenCheck
from .handoff import RenderProcesses
from .limits import Limits
from .registry import ModelRegistry
from .servicer import SERVICE_NAME, RenderServicer


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS; with `client_ca`, clients must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    threads: int = 32  # handler threads; a call or stream holds one while the render process works
    limits: Limits = field(default_factory=Limits)
    tls: TlsFiles | None = None
    tokens: frozenset[str] = frozenset()
    # Connections are closed (GOAWAY) after this long, so that clients resolve
    # again and spread onto replicas added since; calls get max_connection_grace more.
    max_connection_age: float = 300.0
    max_connection_grace: float = 600.0
    reuse_port: bool = False  # let worker processes share the port (workers.py)
    render_processes: int = 2  # per worker: a call need not wait behind one long render (handoff.RenderProcesses)
    compact_tensors: bool = True  # pixel tensors in their exact compact form where it holds (compact.py)
    # gRPC's own message compression of answers (gzip: any gRPC client inflates it); costs
    # server and client CPU, so only for links slower than the renders (bench/README.md).
    compression: str = "none"  # a key of COMPRESSION


COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "deflate": grpc.Compression.Deflate,
    "gzip": grpc.Compression.Gzip,
}


class MethodAwarePool:
    """A descriptor pool that also finds the file of a method's full name.

    Reflection clients may ask for "render.v1.RenderService.RenderTrainingSample"
    (ghz does); protobuf's Python pool resolves services but not methods, so
    grpcio-reflection would answer NOT_FOUND.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)


def start_server(registry: ModelRegistry, renders: RenderProcesses, options: ServerOptions) -> RunningServer:
    """Bind, start and mark healthy a server for `registry` whose renders go to `renders`."""
    check = TokenCheck(options.tokens)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="render"),
        interceptors=[AuthInterceptor(check)] if check else [],
        # Past this many calls at once the server answers RESOURCE_EXHAUSTED at
        # once, instead of queueing without bound.
        maximum_concurrent_rpcs=options.limits.max_concurrent_rpcs,
        compression=COMPRESSION[options.compression],
        options=[
            ("grpc.max_receive_message_length", options.limits.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            # Only workers share a port, on purpose; otherwise a clash is an error.
            ("grpc.so_reuseport", int(options.reuse_port)),
            # Clients keep idle connections alive with pings (channel.py); allow them.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            *_connection_age(options),
        ],
    )
    servicer = RenderServicer(registry, renders)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, servicer.handlers()),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
        pool=MethodAwarePool(descriptor_pool.Default()),
    )
    address = f"{options.host}:{options.port}"
    if options.tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials(options.tls))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    running = RunningServer(server=server, health=health_servicer, port=port)
    running.set_serving(True)
    return running


def _connection_age(options: ServerOptions) -> list[tuple[str, int]]:
    if options.max_connection_age <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(options.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(options.max_connection_grace * 1000)),
    ]


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
