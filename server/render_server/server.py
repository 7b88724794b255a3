"""The gRPC server: the render service plus standard health checking and reflection."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from render_client._pb import render_pb2 as pb
from render_client._pb import render_pb2_grpc as pb_grpc

from .registry import ModelRegistry
from .service import RenderService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RenderService"].full_name


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


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    threads: int = 32  # handler threads; a stream holds one. Renders take turns (rendering.py)
    max_request_bytes: int = 64 * 1024 * 1024
    reuse_port: bool = False  # let worker processes share the port (workers.py)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)


def start_server(registry: ModelRegistry, options: ServerOptions) -> RunningServer:
    """Bind, start and mark healthy a server for `registry`."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="render"),
        options=[
            ("grpc.max_receive_message_length", options.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            # Only workers share a port, on purpose; otherwise a clash is an error.
            ("grpc.so_reuseport", int(options.reuse_port)),
        ],
    )
    pb_grpc.add_RenderServiceServicer_to_server(RenderService(registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
        pool=MethodAwarePool(descriptor_pool.Default()),
    )
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        raise OSError(f"cannot listen on {options.host}:{options.port}")
    server.start()
    running = RunningServer(server=server, health=health_servicer, port=port)
    running.set_serving(True)
    return running
