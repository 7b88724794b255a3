"""How a renderer's own exceptions become statuses."""

from __future__ import annotations

import grpc
import jinja2
import pytest

from render_server.rendering import renderer_error


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            ValueError("Unexpected message role: wizard"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unexpected message role: wizard",
        ),
        (
            NotImplementedError("Video parts are not yet supported"),
            grpc.StatusCode.UNIMPLEMENTED,
            "Video parts are not yet supported",
        ),
        (KeyError("content"), grpc.StatusCode.INVALID_ARGUMENT, "KeyError: 'content'"),
        (
            jinja2.exceptions.UndefinedError("'list object' has no attribute 'startswith'"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UndefinedError: 'list object' has no attribute 'startswith'",
        ),
        (TypeError(), grpc.StatusCode.INVALID_ARGUMENT, "TypeError"),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory rendering this sample"),
    ],
)
def test_renderer_exceptions_map_to_statuses(exc: Exception, code: grpc.StatusCode, details: str) -> None:
    error = renderer_error(exc)
    assert error.code == code and error.details == details and error.error_type == type(exc).__name__
