"""The gRPC server: the render service plus standard health checking and reflection."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from render_client._pb import render_pb2 as pb
from render_client._pb import render_pb2_grpc as pb_grpc

from .registry import ModelRegistry
from .service import RenderService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RenderService"].full_name


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
    )
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    if port == 0:
        raise OSError(f"cannot listen on {options.host}:{options.port}")
    server.start()
    running = RunningServer(server=server, health=health_servicer, port=port)
    running.set_serving(True)
    return running
