"""A worker's gRPC process: the render service's methods and the one grpc.Server that serves them.

`RenderServicer` holds the methods. Request bytes are handed on unparsed to a
render process and its answer goes out as it came (handoff.py), so this
process spends no time on protobuf or on renders: it only moves bytes, which
keeps the GIL free for grpcio's own threads. ListModels is answered here, from
the registry this process holds too. `start_server` assembles the server: the
service, standard health checking and reflection, optional TLS / mutual TLS and
bearer-token authentication.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from render_wire.errors import ERROR_DETAIL_KEY, ERROR_TYPE_KEY, RenderError, encode_error_detail
from render_wire.identity import encode_identity
from render_wire.models import encode_models
from render_wire.pb import render_pb2 as pb

from .auth import AuthInterceptor, TokenCheck
from .handoff import Call, Kind, RenderProcessPool, deadline_in
from .limits import Limits
from .metrics import IN_FLIGHT
from .registry import ModelRegistry

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RenderService"].full_name


class RenderServicer:
    def __init__(self, registry: ModelRegistry, renders: RenderProcessPool, replica: str = "") -> None:
        self._registry = registry
        self._renders = renders
        # Every answer says which replica made it and what each model renders with (render_wire/identity.py):
        # in the trailing metadata of unary calls (no extra write), the initial metadata of streams.
        self._identity = encode_identity(replica, registry.fingerprints())

    def _unary(self, kind: Kind, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        """The handler of a unary method whose request the render process answers."""
        in_flight = IN_FLIGHT.labels(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with in_flight.track_inprogress():
                call = self._renders.start(kind, request, deadline=deadline_in(context.time_remaining()))
                _cancel_when_gone(context, call.cancel)
                answer = call.answers.get()
                if answer.code is not grpc.StatusCode.OK:
                    abort(context, answer.error())
                context.set_trailing_metadata(self._identity)
                return answer.body

        return handle

    def _stream(self, kind: Kind, method: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        """The handler of a stream of request batches (RenderTrainingSamples, Renders)."""
        in_flight = IN_FLIGHT.labels(method)

        def handle(batches: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            context.send_initial_metadata(self._identity)
            with in_flight.track_inprogress():
                current: Call | None = None  # the batch being rendered

                def cancel() -> None:
                    if current is not None:
                        current.cancel()

                _cancel_when_gone(context, cancel)
                index = 0
                for batch in batches:
                    current = self._renders.start(
                        kind, batch, deadline=deadline_in(context.time_remaining()), first_index=index
                    )
                    if not context.is_active():  # it ended before `cancel` could see this batch
                        current.cancel()
                    for answer in current:
                        if answer.code is not grpc.StatusCode.OK:
                            abort(context, answer.error())
                        if answer.body:
                            yield answer.body
                        if answer.last:
                            index = answer.next_index
                    current = None

        return handle

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        context.set_trailing_metadata(self._identity)
        return encode_models(self._registry.describe())

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's method handlers.

        The render methods (all but ListModels) take and answer raw bytes: the
        render process parses and serialises them (a request that does not
        parse is its INVALID_ARGUMENT, where gRPC would answer INTERNAL).
        """
        unary = {
            "RenderTrainingSample": Kind.SAMPLE,
            "Render": Kind.RENDER,
            "ParseResponse": Kind.PARSE,
            "BridgeToNextTurn": Kind.BRIDGE,
            "DescribeRenderer": Kind.DESCRIBE,
            "Calls": Kind.CALLS,
        }
        return {
            **{
                method: grpc.unary_unary_rpc_method_handler(self._unary(kind, method)) for method, kind in unary.items()
            },
            "RenderTrainingSamples": grpc.stream_stream_rpc_method_handler(
                self._stream(Kind.BATCH, "RenderTrainingSamples")
            ),
            "Renders": grpc.stream_stream_rpc_method_handler(self._stream(Kind.RENDER_BATCH, "Renders")),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=_list_models_request,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        }


def _list_models_request(data: bytes) -> pb.ListModelsRequest:
    # It has no fields to get wrong: bytes that do not parse are ignored, like unknown fields.
    try:
        return pb.ListModelsRequest.FromString(data)
    except DecodeError:
        return pb.ListModelsRequest()


def _cancel_when_gone(context: grpc.ServicerContext, cancel: Callable[[], None]) -> None:
    """Run `cancel` when the call ends: it matters only when that is early (cancelled, past its
    deadline, the server stopping); a call already answered has nothing left to cancel."""
    if not context.add_callback(cancel):
        cancel()  # it has ended already


def abort(context: grpc.ServicerContext, error: RenderError) -> NoReturn:
    """End the call with the error's status and one-line details."""
    trailers: list[tuple[str, str | bytes]] = []
    if error.error_type:
        trailers.append((ERROR_TYPE_KEY, error.error_type))
    if error.error_detail is not None:
        trailers.append((ERROR_DETAIL_KEY, encode_error_detail(error.error_detail).encode()))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    context.abort(error.code, error.details)


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
    render_processes: int = 2  # per worker: a call need not wait behind one long render (handoff.RenderProcessPool)
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


def start_server(registry: ModelRegistry, renders: RenderProcessPool, options: ServerOptions) -> RunningServer:
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
    # In a pod, the host name is the pod's name; the port tells servers on one host apart.
    servicer = RenderServicer(registry, renders, replica=f"{socket.gethostname()}:{options.port}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, servicer.handlers()),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
        pool=cast(descriptor_pool.DescriptorPool, MethodAwarePool(descriptor_pool.Default())),  # a stand-in for one
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
