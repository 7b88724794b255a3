"""Statuses map to exceptions trainer code already catches, and to the HTTP port's statuses."""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from render_client import RenderClient, SampleRequest
from render_client.aio import AsyncRenderClient
from render_server import http_app
from render_wire import errors
from render_wire.errors import (
    ERROR_TYPE_KEY,
    InvalidArgumentError,
    ModelNotFoundError,
    RenderError,
    UnavailableError,
    UnimplementedError,
    error_from_rpc,
    error_from_status,
)
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.support import ServerProcess


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


# What the HTTP port answered for each gRPC status before the classes carried it
# (http_app.py's own table then): every other status, 500.
HTTP_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_CLASSES = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, RenderError)]


def http_answer(error: RenderError) -> tuple[int, dict[str, Any]]:
    """The HTTP port's answer to a render that raised `error`: (status, JSON body)."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(http_app._error(send, error))
    start, body = sent
    return start["status"], json.loads(body["body"])


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_each_class_carries_the_http_status_the_http_port_answers(cls: type[RenderError]) -> None:
    assert cls.http_status == HTTP_STATUSES.get(cls.code, 500)
    assert http_answer(cls("details")) == (cls.http_status, {"code": cls.code.name, "message": "details"})


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name)
def test_every_status_answers_as_it_did(code: grpc.StatusCode) -> None:
    error = error_from_status(code, "messages: boom", "KeyError")
    body = {"code": code.name, "message": "messages: boom", "error_type": "KeyError"}
    assert error.http_status == HTTP_STATUSES.get(code, 500)
    assert http_answer(error) == (HTTP_STATUSES.get(code, 500), body)


class FailedCall(grpc.RpcError):
    """A failed call's error, as grpc raises it: its code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def test_an_error_from_a_call_keeps_the_call_s_error_and_its_builtin_family() -> None:
    failed = FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "messages: 'content'", ((ERROR_TYPE_KEY, "KeyError"),))
    error = error_from_rpc(failed)
    assert isinstance(error, InvalidArgumentError) and isinstance(error, KeyError) and error.rpc_error is failed
    assert str(error) == "messages: 'content'" and error.error_type == "KeyError" and error.http_status == 400
    copy = pickle.loads(pickle.dumps(error))  # the call's error stays behind: it does not pickle
    assert type(copy) is type(error) and copy.details == error.details and copy.rpc_error is None
    assert error_from_status(grpc.StatusCode.NOT_FOUND, "model: x").rpc_error is None
    assert RenderError("internal").rpc_error is None


def test_a_failed_call_s_error_is_reachable_though_raised_from_none(server: ServerProcess) -> None:
    request = pb.RenderTrainingSampleRequest(model="nope", messages=[pb.Message(role="user", text="x")])
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as failed:
        RenderServiceStub(channel).RenderTrainingSample(request, timeout=60)
    error = error_from_rpc(failed.value)
    assert type(error) is ModelNotFoundError and error.rpc_error is failed.value
    assert error.http_status == 404

    unknown = SampleRequest(model="nope", messages=[{"role": "user", "content": "x"}])
    with RenderClient(server.target, timeout=60) as client, pytest.raises(ModelNotFoundError) as raised:
        client.render(unknown)
    rpc_error = raised.value.rpc_error
    assert isinstance(rpc_error, grpc.RpcError) and isinstance(rpc_error, grpc.Call)
    assert rpc_error.code() == grpc.StatusCode.NOT_FOUND and rpc_error.details() == raised.value.details

    async def render_async() -> None:
        async with AsyncRenderClient(server.target, timeout=60) as client:
            await client.render(unknown)

    with pytest.raises(ModelNotFoundError) as raised:
        asyncio.run(render_async())
    rpc_error = raised.value.rpc_error
    assert isinstance(rpc_error, grpc.RpcError) and rpc_error.code() == grpc.StatusCode.NOT_FOUND


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50), st.text(min_size=0, max_size=5000), st.text(max_size=50))
def test_details_are_bounded_keeping_their_start_and_end(start: str, echoed: str, end: str) -> None:
    details = f"{start}{echoed}{end}"
    error = InvalidArgumentError(details)
    size = len(error.details.encode("utf-8", "surrogatepass"))
    assert size <= errors.MAX_DETAILS_BYTES
    if len(details.encode("utf-8", "surrogatepass")) <= errors.MAX_DETAILS_BYTES:
        assert error.details == details
    else:  # the field named first and the limit stated last stay; the middle is cut, and says so
        assert error.details.startswith(start) and error.details.endswith(end)
        assert "characters cut...]" in error.details
    assert str(error) == error.details
    assert pickle.loads(pickle.dumps(error)).details == (error.details or "INVALID_ARGUMENT")


def test_an_echoed_model_id_leaves_the_field_and_the_choices() -> None:
    error = ModelNotFoundError(f"model: no model {'x' * 100_000!r} (this server has qwen3, qwen3-vl)")
    assert error.details.startswith("model: no model 'xxx") and error.details.endswith(
        "(this server has qwen3, qwen3-vl)"
    )
    assert "[...99" in error.details and len(error.details) < 1024


# --- another library's exception classes ---------------------------------------------------


def test_a_library_s_exception_comes_back_as_that_class_when_the_caller_has_it() -> None:
    import jinja2  # imported: code that catches jinja2's errors has it

    for cls in (
        jinja2.exceptions.UndefinedError,
        jinja2.exceptions.TemplateSyntaxError,
        jinja2.exceptions.TemplateError,
    ):
        error_type = errors.error_type_name(cls)
        assert error_type == f"jinja2.exceptions.{cls.__name__}"
        error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages: boom", error_type)
        assert (
            isinstance(error, cls)
            and isinstance(error, jinja2.TemplateError)
            and isinstance(error, InvalidArgumentError)
        )
        assert str(error) == "messages: boom" and error.error_type == error_type
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and isinstance(copy, cls)
    # Builtins keep their bare name (as servers before this one sent them).
    assert errors.error_type_name(KeyError) == "KeyError"


def test_a_class_whose_module_is_not_imported_is_not_imported_for_it() -> None:
    import sys

    for error_type in ("no_such_module.Error", "os.path", "builtins.print", "json.decoder.JSONDecodeError.nope"):
        error = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages: x", error_type)
        assert type(error) is InvalidArgumentError, error_type
    assert "no_such_module" not in sys.modules


def test_pydantic_s_validation_error_is_rebuilt_with_its_errors() -> None:
    import pydantic
    import renderers

    with pytest.raises(pydantic.ValidationError) as raised:
        renderers.merge_chat_template_kwargs(renderers.Qwen3RendererConfig(), {"enable_thinking": "maybe"})
    original = raised.value
    detail = errors.validation_error_detail(original)
    assert detail is not None and errors.validation_error_detail(ValueError("x")) is None
    error_type = errors.error_type_name(type(original))
    # As a unary call's trailers carry them (the detail as binary JSON), and as a stream's Error does.
    trailers = (
        (errors.ERROR_TYPE_KEY, error_type),
        (errors.ERROR_DETAIL_KEY, errors.encode_error_detail(detail).encode()),
    )
    from_call = error_from_rpc(
        FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "chat_template_kwargs.enable_thinking: x", trailers)
    )
    for error in (from_call, pickle.loads(pickle.dumps(from_call))):
        assert isinstance(error, pydantic.ValidationError) and isinstance(error, InvalidArgumentError)
        assert error.errors() == original.errors() and error.title == original.title
        assert str(error) == str(original)  # pydantic's own words, as in-process
        assert error.details == "chat_template_kwargs.enable_thinking: x"
    # Without the detail (an older server), a plain InvalidArgumentError: still a ValueError.
    assert type(error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "x", error_type)) is InvalidArgumentError


def test_an_error_detail_that_echoes_its_input_is_cut_to_fit_its_trailer() -> None:
    detail = {
        "title": "Config",
        "errors": [{"type": "bool_parsing", "loc": ["enable_thinking"], "input": "x" * 100_000}],
    }
    error = InvalidArgumentError("x", error_type="ValidationError", error_detail=detail)
    assert error.error_detail is not None
    assert len(errors.encode_error_detail(error.error_detail)) <= errors.MAX_ERROR_DETAIL_BYTES
    assert error.error_detail["errors"][0]["loc"] == ["enable_thinking"]
    assert "characters cut...]" in error.error_detail["errors"][0]["input"]
    small = {"title": "Config", "errors": [{"type": "bool_parsing", "loc": ["a"], "input": "y"}]}
    assert InvalidArgumentError("x", error_detail=small).error_detail == small  # untouched
    many = {"title": "Config", "errors": [{"loc": [str(n)], "input": "z" * 300} for n in range(100)]}
    assert InvalidArgumentError("x", error_detail=many).error_detail is None  # no room even cut: left out


def test_a_renderer_s_exception_says_its_own_message_and_details_name_the_field() -> None:
    # What rendering.renderer_error answers for a renderer's AttributeError, over a call's trailers.
    own = "'list' object has no attribute 'items'"
    trailers = (
        (errors.ERROR_TYPE_KEY, "AttributeError"),
        (errors.ERROR_DETAIL_KEY, errors.encode_error_detail({"message": own}).encode()),
    )
    details = f"messages: AttributeError: {own}"
    error = error_from_rpc(FailedCall(grpc.StatusCode.INVALID_ARGUMENT, details, trailers))
    for each in (error, pickle.loads(pickle.dumps(error))):
        assert isinstance(each, AttributeError) and isinstance(each, InvalidArgumentError)
        assert str(each) == own and each.details == details
    # A multi-line message comes back whole; the status details stay one line.
    multi = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "messages: a b", "ValueError", {"message": "a\nb"})
    assert str(multi) == "a\nb" and multi.details == "messages: a b"
    # An error of the service's own (no error_type) says its details.
    assert str(error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "model: missing")) == "model: missing"
