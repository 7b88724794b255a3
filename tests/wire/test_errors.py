"""Statuses map to exceptions trainer code already catches."""

from __future__ import annotations

import pickle

import grpc
import pytest

from render_wire.errors import (
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


@pytest.mark.parametrize("builtin", [AttributeError, KeyError, TypeError, IndexError, RuntimeError])
def test_a_renderer_s_builtin_exception_keeps_its_family_across_the_wire(builtin: type[Exception]) -> None:
    # What `except AttributeError:` catches in-process, it catches from the service too.
    details = f"messages: {builtin.__name__}: boom"
    error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, details, builtin.__name__)
    assert isinstance(error, builtin) and isinstance(error, InvalidArgumentError) and isinstance(error, ValueError)
    assert str(error) == details and error.error_type == builtin.__name__
    copy = pickle.loads(pickle.dumps(error))  # e.g. raised in a DataLoader worker, re-raised in the trainer
    assert type(copy) is type(error) and copy.details == details and copy.error_type == builtin.__name__


def test_unknown_or_uncombinable_error_types_keep_the_status_class() -> None:
    for error_type in ("ValidationError", "UnicodeDecodeError", "print", None):
        error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages: x", error_type)
        assert type(error) is InvalidArgumentError
