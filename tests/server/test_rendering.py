"""How a renderer's own exceptions become statuses: one line, naming the field."""

from __future__ import annotations

import grpc
import jinja2
import pydantic
import pytest
import renderers

from render_server.rendering import renderer_error


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            ValueError("Unexpected message role: wizard"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages: Unexpected message role: wizard",
        ),
        (
            NotImplementedError("Video parts are not yet supported"),
            grpc.StatusCode.UNIMPLEMENTED,
            "messages: Video parts are not yet supported",
        ),
        (KeyError("content"), grpc.StatusCode.INVALID_ARGUMENT, "messages: KeyError: 'content'"),
        (
            jinja2.exceptions.UndefinedError("'list object' has no attribute 'startswith'"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages: UndefinedError: 'list object' has no attribute 'startswith'",
        ),
        (TypeError(), grpc.StatusCode.INVALID_ARGUMENT, "messages: TypeError"),
        (
            ValueError("Tool call parse failed:\n  line 1\n\n  line 2  "),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages: Tool call parse failed: line 1 line 2",
        ),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED, "messages: out of memory rendering this sample"),
    ],
)
def test_renderer_exceptions_map_to_statuses(exc: Exception, code: grpc.StatusCode, details: str) -> None:
    error = renderer_error(exc, "messages")
    assert error.code == code and error.details == details
    # Builtins by name; other libraries' classes with their module, for the client to rebuild.
    module = type(exc).__module__
    assert error.error_type == (type(exc).__name__ if module == "builtins" else f"{module}.{type(exc).__qualname__}")
    # The renderer's own words ride along, unchanged, for the client's str() (MemoryError: none).
    assert error.error_detail == (None if isinstance(exc, MemoryError) else {"message": str(exc)})


def test_a_renderer_config_refusing_chat_template_kwargs_names_each_key() -> None:
    # What renderers raises for chat_template_kwargs {"enable_thinking": [1]}: pydantic's multi-line error.
    with pytest.raises(pydantic.ValidationError) as caught:
        renderers.merge_chat_template_kwargs(renderers.config_from_name("qwen3"), {"enable_thinking": [1]})
    assert "\n" in str(caught.value)
    error = renderer_error(caught.value, "chat_template_kwargs")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.error_type == "pydantic_core._pydantic_core.ValidationError"
    assert error.details == "chat_template_kwargs.enable_thinking: Input should be a valid boolean (got [1])"
    # What rebuilds the same ValidationError on the client: its title and errors.
    assert error.error_detail == {
        "title": caught.value.title,
        "errors": [
            {"type": "bool_type", "loc": ["enable_thinking"], "msg": "Input should be a valid boolean", "input": [1]}
        ],
    }
