"""Errors shared by client and server: one class per gRPC status code.

The server raises these to answer with a status; the client raises them when
the server answers with one, or when it refuses a request before sending it.
Each class carries its gRPC status (`code`) and the HTTP status the server's
HTTP port answers it with (`http_status`), as google-api-core's exceptions do.
Each also subclasses the builtin exception trainer code already catches around
`renderers.build_training_sample` (ValueError, NotImplementedError, ...), so
switching to the service keeps existing `except` clauses working.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Sequence
from typing import cast

import grpc

# Trailing-metadata key naming the Python exception type a renderer raised.
ERROR_TYPE_KEY = "render-error-type"

# The most UTF-8 bytes of details an error carries. gRPC sends them percent-encoded in a
# header and refuses headers past 8-16 KiB, answering RESOURCE_EXHAUSTED in their place; a
# message that echoes its input (a 100 KiB model id) would be replaced by that.
MAX_DETAILS_BYTES = 1024


class RenderError(Exception):
    """An error render-service answered with (or the client caught first).

    `code` is its gRPC status and `http_status` the HTTP status the HTTP port
    answers with (500 for every status without a class of its own).

    `rpc_error` is the `grpc.RpcError` of the failed call it was made from
    (by error_from_rpc), else None. The client raises these `from None`, so
    that tracebacks show one error, not gRPC's: this attribute, not
    `__cause__`, keeps the call's own error (its `debug_error_string()`,
    trailing metadata, ...) reachable. It does not survive pickling.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, details: str, *, error_type: str | None = None) -> None:
        details = bounded(details)
        super().__init__(details)
        self.details = details
        # The exception type the renderer raised, e.g. "ValueError"; None when the
        # error did not come from the renderer.
        self.error_type = error_type
        self.rpc_error: grpc.RpcError | None = None

    def __str__(self) -> str:
        return self.details  # not KeyError's quoted repr when it is one too

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt through error_from_status, so that it keeps the builtin family it was given.
        return (error_from_status, (self.code, self.details, self.error_type))


class InvalidArgumentError(RenderError, ValueError):
    """The request is malformed, or the renderer rejected the conversation."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class ModelNotFoundError(RenderError, LookupError):
    """The server has no model with the requested id."""

    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class UnimplementedError(RenderError, NotImplementedError):
    """The renderer cannot render this yet (e.g. video in renderers 0.1.12)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501


class ResourceExhaustedError(RenderError):
    """The server is at a limit: too big a request or too many at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class UnavailableError(RenderError, ConnectionError):
    """The server could not be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceededError(RenderError, TimeoutError):
    """The call's deadline passed before the server answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class CallCancelledError(RenderError):
    """The call was cancelled, or its deadline passed, before the server answered."""

    code = grpc.StatusCode.CANCELLED
    http_status = 499


class UnauthenticatedError(RenderError, PermissionError):
    """The call's credentials were missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


_BY_CODE: dict[grpc.StatusCode, type[RenderError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ModelNotFoundError,
        UnimplementedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        CallCancelledError,
    )
}


def bounded(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`details` if it fits in `limit` UTF-8 bytes, else its start and its end around a marker
    saying how much was cut: the field a message names comes first and the limit or the
    choices it states come last, so an echoed value in between is what gets cut."""
    if len(details) <= limit // 4:  # fits whatever its characters
        return details
    size = len(details.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return details
    head = _prefix(details, limit * 5 // 8)
    tail = _prefix(details[::-1], limit * 2 // 8)[::-1]
    return f"{head}[...{len(details) - len(head) - len(tail)} characters cut...]{tail}"


def _prefix(text: str, size: int) -> str:
    """The longest start of `text` of at most `size` UTF-8 bytes."""
    prefix = text[:size]
    while len(prefix.encode("utf-8", "surrogatepass")) > size:
        prefix = prefix[: -max(1, (len(prefix.encode("utf-8", "surrogatepass")) - size) // 4)]
    return prefix


def invalid(field: str, problem: str) -> InvalidArgumentError:
    """The one-line error for a malformed request field: 'field: problem'."""
    return InvalidArgumentError(f"{field}: {problem}")


def error_from_status(code: grpc.StatusCode, details: str | None, error_type: str | None = None) -> RenderError:
    """The RenderError for a status the server answered with.

    When a renderer raised a builtin exception (error_type "AttributeError",
    "KeyError", ...), the error is an instance of that builtin too, so trainer
    code catching what renderers raises in-process catches it remotely as well.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        error = RenderError(details or code.name, error_type=error_type)
        error.code = code
        return error
    return _in_builtin_family(cls, error_type)(details or code.name, error_type=error_type)


def _in_builtin_family(cls: type[RenderError], error_type: str | None) -> type[RenderError]:
    # What a renderer raises on a request is answered INVALID_ARGUMENT (NotImplementedError: UNIMPLEMENTED).
    if cls is not InvalidArgumentError:
        return cls
    builtin = getattr(builtins, error_type, None) if error_type else None
    if not isinstance(builtin, type) or not issubclass(builtin, Exception) or issubclass(cls, builtin):
        return cls
    return _combined(cls, builtin)  # type: ignore[arg-type]  # classes are hashable; mypy's stubs say otherwise


@functools.cache
def _combined(cls: type[RenderError], builtin: type[Exception]) -> type[RenderError]:
    """`cls` that is also a `builtin` (cls itself where the two cannot be combined)."""
    try:
        combined = type(cls.__name__, (cls, builtin), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        combined("probe")  # some builtins (UnicodeDecodeError, ...) take other arguments
    except TypeError:
        return cls
    return combined


def error_from_rpc(exc: grpc.RpcError) -> RenderError:
    """The RenderError for a failed call (sync or asyncio); its `rpc_error` is `exc`."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    error_type = None
    # (key, value) tuples at run time, whatever grpc's stubs say.
    trailers = cast("Sequence[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
    for key, value in trailers:
        if key == ERROR_TYPE_KEY:
            error_type = value if isinstance(value, str) else value.decode()
    error = error_from_status(code, exc.details(), error_type)
    error.rpc_error = exc  # raised `from None` by the client: see RenderError
    return error
