"""Errors shared by client and server: one class per gRPC status code.

The server raises these to answer with a status; the client raises them when
the server answers with one, or when it refuses a request before sending it.
Each class carries its gRPC status (`code`) and the HTTP status the server's
HTTP port answers it with (`http_status`), as google-api-core's exceptions do.
Each also subclasses the builtin exception trainer code already catches around
`renderers.build_training_sample` (ValueError, NotImplementedError, ...), so
switching to the service keeps existing `except` clauses working; and when a
renderer raised an exception of a library the caller has imported (jinja2's
TemplateError family, pydantic's ValidationError), the error is an instance of
that class too.
"""

from __future__ import annotations

import builtins
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any, cast

import grpc

# Trailing-metadata key naming the Python exception type a renderer raised.
ERROR_TYPE_KEY = "render-error-type"
# Trailing-metadata key (binary) with what rebuilds a pydantic ValidationError: JSON text.
ERROR_DETAIL_KEY = "render-error-detail-bin"
# pydantic's ValidationError, which takes its title and errors to be built.
_VALIDATION_ERROR = ("pydantic_core._pydantic_core", "ValidationError")

# The most UTF-8 bytes of details an error carries. gRPC sends them percent-encoded in a
# header and refuses headers past 8-16 KiB, answering RESOURCE_EXHAUSTED in their place; a
# message that echoes its input (a 100 KiB model id) would be replaced by that.
MAX_DETAILS_BYTES = 1024
# The most bytes of an error_detail's JSON: it travels base64-encoded in a trailer beside them.
MAX_ERROR_DETAIL_BYTES = 3 * 1024


class RenderError(Exception):
    """An error render-service answered with (or the client caught first).

    `code` is its gRPC status and `http_status` the HTTP status the HTTP port
    answers with (500 for every status without a class of its own).

    `str(error)` is `details` (one line, naming the field), except for an
    exception a renderer raised (`error_type` set): then it is that exception's
    own message, as in-process, and `details` adds the field.

    `rpc_error` is the `grpc.RpcError` of the failed call it was made from
    (by error_from_rpc), else None. The client raises these `from None`, so
    that tracebacks show one error, not gRPC's: this attribute, not
    `__cause__`, keeps the call's own error (its `debug_error_string()`,
    trailing metadata, ...) reachable. It does not survive pickling.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(
        self, details: str, *, error_type: str | None = None, error_detail: dict[str, Any] | None = None
    ) -> None:
        details = bounded(details)
        super().__init__(details)
        self._set(details, error_type, error_detail)

    def _set(self, details: str, error_type: str | None, error_detail: dict[str, Any] | None) -> None:
        # Bounded here, the one place every error passes: they travel in gRPC's headers.
        self.details = bounded(details)
        # The exception type the renderer raised: a builtin's name ("ValueError") or a
        # library's class with its module ("jinja2.exceptions.UndefinedError"); None
        # when the error did not come from the renderer.
        self.error_type = error_type
        # What more the server said of a renderer's exception: {"message": its own str()}, or
        # for a pydantic ValidationError {"title": ..., "errors": [...]}; else None.
        self.error_detail = bounded_detail(error_detail)
        self.rpc_error: grpc.RpcError | None = None

    def __str__(self) -> str:
        # A renderer's exception says what it says in-process (`details` adds the field and
        # keeps it on one line); any other error, its details.
        message = self.error_detail.get("message") if self.error_type and self.error_detail else None
        return message if isinstance(message, str) else self.details

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt through error_from_status, so that it keeps the family it was given.
        return (error_from_status, (self.code, self.details, self.error_type, self.error_detail))


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


def bounded_detail(detail: dict[str, Any] | None) -> dict[str, Any] | None:
    """`detail` if its JSON fits in MAX_ERROR_DETAIL_BYTES; else with every string in it cut as
    `bounded` cuts (the input a pydantic error echoes); None if even that is too long."""
    if detail is None or len(encode_error_detail(detail).encode("utf-8", "surrogatepass")) <= MAX_ERROR_DETAIL_BYTES:
        return detail
    cut = _cut_strings(detail)
    if len(encode_error_detail(cut).encode("utf-8", "surrogatepass")) <= MAX_ERROR_DETAIL_BYTES:
        return cast("dict[str, Any]", cut)
    return None


def _cut_strings(value: Any) -> Any:
    if isinstance(value, str):
        return bounded(value, 256)
    if isinstance(value, dict):
        return {key: _cut_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut_strings(item) for item in value]
    return value


def _prefix(text: str, size: int) -> str:
    """The longest start of `text` of at most `size` UTF-8 bytes."""
    prefix = text[:size]
    while len(prefix.encode("utf-8", "surrogatepass")) > size:
        prefix = prefix[: -max(1, (len(prefix.encode("utf-8", "surrogatepass")) - size) // 4)]
    return prefix


def invalid(field: str, problem: str) -> InvalidArgumentError:
    """The one-line error for a malformed request field: 'field: problem'."""
    return InvalidArgumentError(f"{field}: {problem}")


def error_type_name(exc_type: type[BaseException]) -> str:
    """How `error_type` names an exception class: a builtin by its name, others with their module."""
    if exc_type.__module__ == "builtins":
        return exc_type.__name__
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def error_from_status(
    code: grpc.StatusCode,
    details: str | None,
    error_type: str | None = None,
    error_detail: dict[str, Any] | None = None,
) -> RenderError:
    """The RenderError for a status the server answered with.

    When a renderer raised a builtin exception (error_type "AttributeError",
    "KeyError", ...), the error is an instance of that builtin too, so trainer
    code catching what renderers raises in-process catches it remotely as well;
    so it is for another library's exception class (error_type
    "jinja2.exceptions.UndefinedError") when this process has imported its
    module (code that catches it has), and for pydantic's ValidationError, rebuilt
    with its errors from `error_detail`.
    """
    details = details or code.name
    cls = _BY_CODE.get(code)
    if cls is None:
        error = RenderError(details, error_type=error_type, error_detail=error_detail)
        error.code = code
        return error
    family = _family(cls, error_type)
    if family is cls:
        return cls(details, error_type=error_type, error_detail=error_detail)
    if _is_validation_error(family):
        validation_error = _validation_error(family, error_detail)
        if validation_error is not None:
            validation_error._set(details, error_type, error_detail)
            return validation_error
        return cls(details, error_type=error_type, error_detail=error_detail)
    return family(details, error_type=error_type, error_detail=error_detail)


def _family(cls: type[RenderError], error_type: str | None) -> type[RenderError]:
    """`cls`, made an instance of the class `error_type` names where that can be."""
    # What a renderer raises on a request is answered INVALID_ARGUMENT (NotImplementedError: UNIMPLEMENTED).
    if cls is not InvalidArgumentError or not error_type:
        return cls
    if "." in error_type:
        # Another library's class: only from a module already imported, so that an answer
        # never makes the client import anything (and code catching it has imported it).
        module_name, _, qualname = error_type.rpartition(".")
        found: object = sys.modules.get(module_name)
        for part in qualname.split(".") if found is not None else ():
            found = getattr(found, part, None)
    else:
        found = getattr(builtins, error_type, None)
    if not isinstance(found, type) or not issubclass(found, Exception) or issubclass(cls, found):
        return cls
    return _combined(cls, found)  # type: ignore[arg-type]  # classes are hashable; mypy's stubs say otherwise


@functools.cache
def _combined(cls: type[RenderError], other: type[Exception]) -> type[RenderError]:
    """`cls` that is also an `other` (cls itself where the two cannot be combined)."""
    namespace: dict[str, object] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if _is_validation_error(other):
        # Built by pydantic (from_exception_data), which calls the class with its own arguments;
        # and it reads as pydantic writes it, as in-process.
        namespace["__init__"] = _no_init
        namespace["__str__"] = other.__str__
        try:
            return type(cls.__name__, (cls, other), namespace)
        except TypeError:
            return cls
    try:
        combined = type(cls.__name__, (cls, other), namespace)
        combined("probe")  # some classes (UnicodeDecodeError, ...) take other arguments
    except TypeError:
        return cls
    return combined


def _is_validation_error(cls: type) -> bool:
    return any((base.__module__, base.__name__) == _VALIDATION_ERROR for base in cls.__mro__)


def _no_init(self: object, *args: object, **kwargs: object) -> None:
    pass


def _validation_error(cls: type[RenderError], detail: dict[str, Any] | None) -> RenderError | None:
    """A pydantic ValidationError of class `cls` with the title and errors of `detail`, or None."""
    if not isinstance(detail, dict) or not isinstance(detail.get("title"), str):
        return None
    build = getattr(cls, "from_exception_data", None)
    try:
        return cast(RenderError, build(detail["title"], detail.get("errors") or [])) if build else None
    except (TypeError, ValueError, KeyError):  # errors this pydantic does not know
        return None


def validation_error_detail(exc: BaseException) -> dict[str, Any] | None:
    """What rebuilds `exc` if it is a pydantic ValidationError (error_from_status), else None."""
    if not _is_validation_error(type(exc)):
        return None
    errors = exc.errors(include_url=False)  # type: ignore[attr-defined]
    # Context values that are not JSON (an exception a validator raised) travel as their text.
    return {"title": exc.title, "errors": json.loads(json.dumps(errors, default=str))}  # type: ignore[attr-defined]


def error_from_rpc(exc: grpc.RpcError) -> RenderError:
    """The RenderError for a failed call (sync or asyncio); its `rpc_error` is `exc`."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    error_type = error_detail = None
    # (key, value) tuples at run time, whatever grpc's stubs say.
    trailers = cast("Sequence[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
    for key, value in trailers:
        if key == ERROR_TYPE_KEY:
            error_type = value if isinstance(value, str) else value.decode()
        elif key == ERROR_DETAIL_KEY:
            error_detail = decode_error_detail(value)
    error = error_from_status(code, exc.details(), error_type, error_detail)
    error.rpc_error = exc  # raised `from None` by the client: see RenderError
    return error


def encode_error_detail(detail: dict[str, Any] | None) -> str:
    """`error_detail` as the Error message's error_detail_json: "" for None."""
    return "" if detail is None else json.dumps(detail, ensure_ascii=False, separators=(",", ":"))


def decode_error_detail(text: str | bytes) -> dict[str, Any] | None:
    """An error_detail_json (or its trailer); None when empty or not a JSON object."""
    if not text:
        return None
    try:
        detail = json.loads(text)
    except ValueError:
        return None
    return detail if isinstance(detail, dict) else None
