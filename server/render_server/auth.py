"""Bearer-token authentication for every RPC except health checks.

Tokens come from a file (one per line; blank lines and # comments ignored)
and/or an environment variable (separated by commas or whitespace). With no
tokens configured, authentication is off. Callers send
`authorization: Bearer <token>` metadata (an HTTP header for the HTTP port).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import grpc

TOKENS_ENV = "RENDER_SERVICE_TOKENS"
# Probes must work without credentials; they reveal nothing but "serving".
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"
REFUSAL = "missing or invalid bearer token"


def load_tokens(path: Path | None, environ: dict[str, str] | None = None) -> frozenset[str]:
    """The accepted tokens from `path` and $RENDER_SERVICE_TOKENS."""
    tokens: set[str] = set()
    if path is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.add(line)
    tokens.update((environ if environ is not None else os.environ).get(TOKENS_ENV, "").replace(",", " ").split())
    return frozenset(tokens)


class TokenCheck:
    """Whether an `authorization` value carries one of the accepted tokens."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def allows(self, authorization: str | None) -> bool:
        if not self._tokens:
            return True
        if not authorization or not authorization.startswith("Bearer "):
            return False
        offered = authorization[len("Bearer ") :].strip().encode()
        # Compare against every token, in constant time, whatever matches.
        return any([hmac.compare_digest(offered, token) for token in self._tokens])


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, check: TokenCheck) -> None:
        self._check = check

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        # A text key's value is a str (only "-bin" keys carry bytes).
        authorization = cast(
            "str | None", next((value for key, value in details.invocation_metadata if key == "authorization"), None)
        )
        if self._check.allows(authorization):
            return handler
        return _refusal(handler)


def _refuse(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def _refusal(handler: Any) -> Any:
    """A handler of the same shape as `handler` that refuses the call."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(_refuse, **serializers)
