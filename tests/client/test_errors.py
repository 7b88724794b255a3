"""Statuses map to exceptions trainer code already catches."""

from __future__ import annotations

import grpc
import pytest

from render_client.errors import (
    InvalidArgumentError,
    ModelNotFoundError,
    RenderError,
    UnavailableError,
    UnimplementedError,
    error_from_status,
)


@pytest.mark.parametrize(
    ("code", "cls", "builtin"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError, ValueError),
        (grpc.StatusCode.NOT_FOUND, ModelNotFoundError, LookupError),
        (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError, NotImplementedError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError, ConnectionError),
    ],
)
def test_each_status_has_its_exception(code: grpc.StatusCode, cls: type, builtin: type) -> None:
    error = error_from_status(code, "details", "ValueError")
    assert type(error) is cls and isinstance(error, builtin)
    assert error.code == code and error.details == "details" and str(error) == "details"
    assert error.error_type == "ValueError"


def test_unmapped_statuses_keep_their_code() -> None:
    error = error_from_status(grpc.StatusCode.DATA_LOSS, None)
    assert type(error) is RenderError and error.code == grpc.StatusCode.DATA_LOSS
    assert error.details == "DATA_LOSS" and error.error_type is None
