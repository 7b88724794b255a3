"""The HTTP port, served by uvicorn in a process of its own beside the gRPC workers.

    GET  /healthz                   200 while the supervisor and every worker are alive (status.py), else 503
    GET  /readyz                    200 when every worker serves and the server is not draining, else 503
    GET  /metrics                   Prometheus text, all processes added up
    POST /v1/render_training_sample a RenderTrainingSampleRequest in the protobuf JSON mapping;
                                    answers {"sample": ...} or {"code": ..., "message": ...}
    POST /v1/render, /v1/parse_response, /v1/bridge_to_next_turn, /v1/describe_renderer:
                                    the Renderer protocol's methods, likewise (Render,
                                    ParseResponse, BridgeToNextTurn, DescribeRenderer)

This process's event loop only moves bytes: a POST's body goes as it came to
the HTTP process's render process (json_calls.py, through handoff.py), which
parses the JSON and renders with the same limits, metrics and errors as a gRPC
call; so health and metrics answer at once while it parses tens of MiB of
JSON or renders. The bearer-token check is here; health and metrics stay open.
Like a worker past --max-concurrent-rpcs, the port answers 429
(RESOURCE_EXHAUSTED) while that many renders are waiting or running.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import uvicorn

from render_wire.errors import RenderError, ResourceExhaustedError, UnauthenticatedError

from .auth import REFUSAL, TokenCheck
from .handoff import RenderProcessProxy
from .json_calls import ROUTES, Route
from .metrics import exposition
from .server import TlsFiles
from .status import SharedStatus

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpApp:
    """A small ASGI application; no framework, a few routes."""

    def __init__(
        self,
        renders: RenderProcessProxy,
        status: SharedStatus,
        check: TokenCheck,
        max_body_bytes: int,
        max_renders: int,
    ) -> None:
        self._renders = renders  # the HTTP process's render process (json_calls.JsonCalls answers there)
        self._status = status
        self._check = check
        self._max_body_bytes = max_body_bytes
        # Renders waiting or running at once; more are refused, as gRPC refuses past --max-concurrent-rpcs.
        self._max_renders = max_renders
        self._renders_in_flight = 0
        # Each call waits for its answer on a thread of its own, so the loop never blocks.
        self._waiting = ThreadPoolExecutor(max_workers=max_renders, thread_name_prefix="http-answer")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("GET", "/healthz"):
            alive, reason = self._status.liveness()
            await _respond(send, 200 if alive else 503, (reason + "\n").encode())
        elif route == ("GET", "/readyz"):
            ready, reason = self._status.readiness()
            await _respond(send, 200 if ready else 503, (reason + "\n").encode())
        elif route == ("GET", "/metrics"):
            body, content_type = exposition()
            await _respond(send, 200, body, content_type)
        elif scope["path"] in ROUTES:
            if scope["method"] != "POST":
                await _respond(send, 405, b"use POST\n", headers=[(b"allow", b"POST")])
            else:
                await self._render(scope, receive, send)
        else:
            await _respond(send, 404, b"not found\n")

    async def _render(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        if not self._check.allows(authorization):
            await _error(send, UnauthenticatedError(REFUSAL))
            return
        if self._renders_in_flight >= self._max_renders:
            await _error(
                send,
                ResourceExhaustedError(
                    f"the HTTP port is rendering its limit of {self._max_renders} requests at once "
                    "(--max-concurrent-rpcs); retry later"
                ),
            )
            return
        self._renders_in_flight += 1  # the event loop's thread is the only one to count
        try:
            await self._render_counted(ROUTES[scope["path"]], receive, send)
        finally:
            self._renders_in_flight -= 1

    async def _render_counted(self, route: Route, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, self._max_body_bytes)
        if body is None:
            await _error(
                send,
                ResourceExhaustedError(
                    f"request body exceeds the limit of {self._max_body_bytes} bytes (--max-request-mb)"
                ),
            )
            return
        call = self._renders.start(route.kind, body, deadline=math.inf)
        del body  # the render process has it
        answer = await asyncio.get_running_loop().run_in_executor(self._waiting, call.answers.get)
        if answer.code is not grpc.StatusCode.OK:
            await _error(send, answer.error())
            return
        await _respond(send, 200, answer.body, "application/json")


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(send: Send, error: RenderError) -> None:
    """Answer `error` as {"code", "message"[, "error_type"][, "error_detail"]}, with its class's HTTP status."""
    body: dict[str, object] = {"code": error.code.name, "message": error.details}
    if error.error_type:
        body["error_type"] = error.error_type
    if error.error_detail is not None:
        body["error_detail"] = error.error_detail
    await _respond(send, error.http_status, json.dumps(body).encode(), "application/json")


_PIECE = 1 << 20  # bytes of an answer handed to the server at once


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    # In pieces: a JSON answer with pixel tensors runs to hundreds of MiB, which TLS encrypts on the
    # event loop; between pieces (and while the client catches up) the loop answers health probes.
    for start in range(0, max(len(body), 1), _PIECE):
        end = start + _PIECE
        await send({"type": "http.response.body", "body": body[start:end], "more_body": end < len(body)})


def serve_http(
    app: HttpApp, sock: socket.socket, tls: TlsFiles | None, grace: float, stop: threading.Event | None = None
) -> None:
    """Run uvicorn on the already-bound `sock` until SIGTERM, or until `stop` is set; blocks."""
    tls_options: dict[str, Any] = {}
    if tls is not None:
        tls_options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            tls_options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, int(grace)),
        **tls_options,
    )
    server = uvicorn.Server(config)
    if stop is not None:

        def exit_when_stopped() -> None:
            stop.wait()
            server.should_exit = True  # uvicorn's loop looks every 0.1 s

        threading.Thread(target=exit_when_stopped, name="http-stop", daemon=True).start()
    server.run(sockets=[sock])
