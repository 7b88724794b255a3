"""How clients open channels to render-service: resilient by default.

- Retries: calls that fail UNAVAILABLE (a server restarting, a worker killed,
  a replica going away) or that a shutting-down server CANCELLED before taking
  them up are retried with exponential backoff by gRPC itself, through the
  retry policy in the service config below, and sent again by the clients
  (`resend_delay`) when gRPC gives up on a broken connection. Rendering has no
  side effects, so a retry is always safe.
- Load balancing: round_robin over every address the target resolves to
  ("dns:///render-service.ns.svc:50051" behind a headless Service), or over
  an explicit list of addresses (`target_for`).
- Keepalive pings notice dead connections between calls.
- Message size limits are lifted: responses carry pixel tensors that can run
  to hundreds of MiB for a large image (the server enforces its request limit).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import grpc
import grpc.aio

from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub

ChannelOptions = Sequence[tuple[str, object]]

SERVICE = "render.v1.RenderService"
# One backoff for gRPC's retries and the clients' own resends (resend_delay).
_INITIAL_BACKOFF, _MAX_BACKOFF, _BACKOFF_MULTIPLIER = 0.1, 2.0, 2.0


class RetryPolicy(TypedDict):
    """A gRPC service config's retryPolicy."""

    maxAttempts: int
    initialBackoff: str
    maxBackoff: str
    backoffMultiplier: float
    retryableStatusCodes: list[str]


RETRY_POLICY: RetryPolicy = {
    "maxAttempts": 5,
    "initialBackoff": f"{_INITIAL_BACKOFF:g}s",
    "maxBackoff": f"{_MAX_BACKOFF:g}s",
    "backoffMultiplier": _BACKOFF_MULTIPLIER,
    # CANCELLED: a server that shuts down cancels the calls it had received
    # but not yet handed to a handler. gRPC never retries a call its caller
    # cancelled, and the client cancels unary calls only by closing.
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}
_RESENT_CODES = frozenset(grpc.StatusCode[name] for name in RETRY_POLICY["retryableStatusCodes"])
# gRPC's own retries do not cover every broken connection: a call in flight when
# its connection is reset can fail UNAVAILABLE ("Stream removed") without a
# retry. Clients therefore send such calls again themselves, on the same policy;
# a unary call is resent at most twice, gRPC having tried up to 5 times each.
UNARY_ATTEMPTS = 3


def resend_delay(
    error: Exception, attempt: int, deadline: float | None = None, *, attempts: int = RETRY_POLICY["maxAttempts"]
) -> float | None:
    """Seconds to wait before sending a call again after it failed with `error`, or None to give up.

    `attempt` counts from 0 up to `attempts` in all; `deadline` is a
    time.monotonic() the call must end by.
    """
    if getattr(error, "code", None) not in _RESENT_CODES or attempt + 1 >= attempts:
        return None
    delay = min(_INITIAL_BACKOFF * _BACKOFF_MULTIPLIER**attempt, _MAX_BACKOFF)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def deadline_for(timeout: float | None) -> float | None:
    """The time.monotonic() a call with `timeout` must end by."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """The timeout left to a call that must end by `deadline`."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY},
        # Not the streams: gRPC would hold a stream whose server died before its first
        # answer for retries that never come; the stream engines resend it themselves.
        {"name": [{"service": SERVICE, "method": method} for method in ("RenderTrainingSamples", "Renders")]},
    ],
}
_MiB = 1024 * 1024

_DEFAULT_OPTIONS: dict[str, object] = {
    "grpc.max_receive_message_length": -1,
    "grpc.max_send_message_length": -1,
    "grpc.service_config": json.dumps(SERVICE_CONFIG),
    "grpc.enable_retries": 1,
    # A call can only be retried while its request is buffered; gRPC's default
    # buffer (256 KiB) would leave requests with images out.
    "grpc.per_rpc_retry_buffer_size": 64 * _MiB,
    "grpc.retry_buffer_size": 256 * _MiB,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}


def target_for(addresses: str | Sequence[str]) -> str:
    """A gRPC target for one target string, or for a list of "ip:port" addresses.

    A list becomes a static address list ("ipv4:10.0.0.1:50051,10.0.0.2:50051")
    that round_robin spreads calls over; for names that resolve to several
    addresses use "dns:///name:port" instead.
    """
    if isinstance(addresses, str):
        return addresses
    if not addresses:
        raise ValueError("no addresses given")
    hosts = [address.rsplit(":", 1) for address in addresses]
    try:
        ips = [ipaddress.ip_address(host.strip("[]")) for host, _ in hosts]
    except ValueError:
        raise ValueError('a list of addresses must be "ip:port"; for host names use "dns:///name:port"') from None
    if all(ip.version == 4 for ip in ips):
        return "ipv4:" + ",".join(addresses)
    if all(ip.version == 6 for ip in ips):
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, (_, port) in zip(ips, hosts, strict=True))
    raise ValueError("a list of addresses must be all IPv4 or all IPv6")


def tls_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: `ca` to trust the server (default: system roots); `cert` and `key` for mTLS.

    Unlike gRPC's own, they can be pickled (with the PEM files' contents), so a
    client using them can be handed to DataLoader workers.
    """
    return TlsCredentials(
        ca.read_bytes() if ca else None, key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )


class TlsCredentials(grpc.ChannelCredentials):
    """grpc.ssl_channel_credentials that pickle as the PEM bytes they were made from."""

    def __init__(self, ca: bytes | None, key: bytes | None, cert: bytes | None) -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        super().__init__(credentials._credentials)  # type: ignore[attr-defined]  # gRPC's own handle: not in its stubs
        self._pem = (ca, key, cert)

    def __reduce__(self) -> tuple[type[TlsCredentials], tuple[bytes | None, bytes | None, bytes | None]]:
        return (TlsCredentials, self._pem)


def channel_options(options: ChannelOptions = (), *, own_connection: bool = False) -> list[tuple[str, object]]:
    """The default channel options, overridden by `options`.

    `own_connection` gives the channel a connection of its own: by default gRPC
    shares one connection among channels with the same target and options, and
    a server's worker processes (SO_REUSEPORT) are spread per connection.
    """
    merged = dict(_DEFAULT_OPTIONS)
    if own_connection:
        merged["grpc.use_local_subchannel_pool"] = 1
    merged.update(options)
    return list(merged.items())


def open_channels(
    target: str,
    count: int,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> list[grpc.Channel]:
    """`count` blocking channels to `target`, one connection (per address) each."""
    merged = channel_options(options, own_connection=count > 1)
    if credentials is None:
        return [grpc.insecure_channel(target, options=merged) for _ in range(count)]
    return [grpc.secure_channel(target, credentials, options=merged) for _ in range(count)]


def open_aio_channels(
    target: str,
    count: int,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
) -> list[grpc.aio.Channel]:
    """`count` asyncio channels to `target`, one connection (per address) each."""
    merged = channel_options(options, own_connection=count > 1)
    if credentials is None:
        return [grpc.aio.insecure_channel(target, options=merged) for _ in range(count)]
    return [grpc.aio.secure_channel(target, credentials, options=merged) for _ in range(count)]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying a bearer token, if any."""
    return (("authorization", f"Bearer {token}"),) if token else None


class RenderStub(RenderServiceStub):
    """The generated stub, except that the render methods answer with the serialised bytes.

    samples.decode_response and decode_results read them so that pixel tensors
    are views of the received bytes rather than copies.
    """

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        super().__init__(channel)  # type: ignore[no-untyped-call]  # generated by grpc_tools: no annotations
        # The methods a client coalesces take their requests serialised (render_wire.calls batches
        # them as they are), and answer the bytes, as do the streams.
        self.RenderTrainingSample = channel.unary_unary(_METHOD_PATH.format("RenderTrainingSample"))
        self.RenderTrainingSamples = channel.stream_stream(
            _METHOD_PATH.format("RenderTrainingSamples"),
            request_serializer=pb.RenderTrainingSamplesRequest.SerializeToString,
        )
        self.Render = channel.unary_unary(_METHOD_PATH.format("Render"))
        self.ParseResponse = channel.unary_unary(_METHOD_PATH.format("ParseResponse"))
        self.Renders = channel.stream_stream(
            _METHOD_PATH.format("Renders"), request_serializer=pb.RendersRequest.SerializeToString
        )
        self.BridgeToNextTurn = channel.unary_unary(_METHOD_PATH.format("BridgeToNextTurn"))
        self.Calls = channel.unary_unary(_METHOD_PATH.format("Calls"))


_METHOD_PATH = "/" + pb.DESCRIPTOR.services_by_name["RenderService"].full_name + "/{}"


@dataclass(frozen=True)
class ConnectionSettings:
    """What a client connects with; it can be pickled, so a client can open its connection anew in
    another process (channels themselves do not survive a fork)."""

    target: str | Sequence[str]
    connections: int
    token: str | None
    credentials: grpc.ChannelCredentials | None
    options: ChannelOptions

    def connect(self, *, asyncio: bool) -> Connection:
        return Connection(
            self.target,
            connections=self.connections,
            token=self.token,
            credentials=self.credentials,
            options=self.options,
            asyncio=asyncio,
        )

    def __reduce__(
        self,
    ) -> tuple[
        type[ConnectionSettings],
        tuple[str | Sequence[str], int, str | None, grpc.ChannelCredentials | None, ChannelOptions],
    ]:
        if self.credentials is not None and not isinstance(self.credentials, TlsCredentials):
            raise TypeError(
                "a client with credentials other than render_client.tls_credentials(...) cannot be pickled: "
                "gRPC credentials do not cross processes"
            )
        return (ConnectionSettings, (self.target, self.connections, self.token, self.credentials, self.options))


class Connection:
    """What a client calls through: its channels, a stub per channel, and the call metadata."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        connections: int,
        token: str | None,
        credentials: grpc.ChannelCredentials | None,
        options: ChannelOptions,
        asyncio: bool,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        open_ = open_aio_channels if asyncio else open_channels
        self.channels = open_(target_for(target), connections, credentials=credentials, options=options)
        self.stubs = [RenderStub(channel) for channel in self.channels]
        # Unary calls take the connections in turn.
        self.next_stub = itertools.cycle(self.stubs).__next__
        self.metadata = auth_metadata(token)
        self.closed = False

    def resend_delay(self, error: Exception, attempt: int, deadline: float | None) -> float | None:
        """`resend_delay` for a unary call through this connection; None once it is closed."""
        return None if self.closed else resend_delay(error, attempt, deadline, attempts=UNARY_ATTEMPTS)
