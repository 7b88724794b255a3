"""Parity: every sample through a real server and the client equals the in-process one.

For every default model, every conversation of the corpus (tests/fixtures) and every
option set below, `render_client.build_training_sample` against a live
render-server returns exactly what `renderers.build_training_sample` returns
in-process (token_ids, loss_mask, mm_token_type_ids, mm_hashes,
mm_placeholders and every mm_items array's dtype, shape and bytes), or both
fail with the same exception type and message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import renderers

from render_client import RenderClient, RenderError, build_training_sample
from tests.reference import (
    RefusedRenderer,
    expected_error_details,
    expected_error_type,
    reference_renderer,
    sample_differences,
)
from tests.support import DEFAULT_MODELS, ServerProcess, corpus, running_server


@dataclass(frozen=True)
class Options:
    """One way of calling build_training_sample."""

    name: str
    role_to_mask: Callable[[dict[str, Any]], bool] | None = None
    content_sft_roles: frozenset[str] | None = None
    ensure_final_stop: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    alternate_message_loss_mask: bool = False

    def call_arguments(self, conversation: dict[str, Any]) -> dict[str, Any]:
        messages = conversation["messages"]
        return {
            "role_to_mask": self.role_to_mask,
            "tools": conversation.get("tools"),
            "content_sft_roles": self.content_sft_roles,
            "ensure_final_stop": self.ensure_final_stop,
            "message_loss_mask": [i % 2 == 0 for i in range(len(messages))]
            if self.alternate_message_loss_mask
            else None,
        }


def _assistant(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant"


def _assistant_or_tool(message: dict[str, Any]) -> bool:
    return message["role"] in ("assistant", "tool")


OPTIONS = [
    Options("role_to_mask=None"),
    Options("assistant only", role_to_mask=_assistant),
    Options("assistant and tool", role_to_mask=_assistant_or_tool),
    Options("content_sft_roles=tool", role_to_mask=_assistant, content_sft_roles=frozenset({"tool"})),
    Options("ensure_final_stop", role_to_mask=_assistant, ensure_final_stop=True),
    Options("enable_thinking=false", role_to_mask=_assistant, chat_template_kwargs={"enable_thinking": False}),
    Options("message_loss_mask", role_to_mask=_assistant, alternate_message_loss_mask=True),
]


@dataclass
class Tally:
    samples: int = 0
    with_media: int = 0
    rejected: int = 0
    mismatches: list[str] = field(default_factory=list)


def render_both(client: RenderClient, model: str, options: Options, *, threads: int = 1) -> Tally:
    """Every corpus conversation in-process and through `client`; with `threads`, the service's
    calls all made at once from that many threads (so that the client coalesces them)."""
    tally = Tally()
    try:
        local = reference_renderer(model, options.chat_template_kwargs)
        construction_error: Exception | None = None
    except Exception as exc:  # renderers refuses these kwargs for this model
        local, construction_error = None, exc
    try:
        remote = client.renderer(model, chat_template_kwargs=options.chat_template_kwargs)
    except RenderError as exc:  # refused at once, as create_renderer refuses in-process: compared below
        remote = RefusedRenderer(exc)

    def served(conversation: dict[str, Any]) -> Any:
        try:
            return build_training_sample(remote, conversation["messages"], **options.call_arguments(conversation))
        except RenderError as exc:
            return exc

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            answers: Iterator[Any] = iter(list(pool.map(served, corpus())))
    else:
        answers = map(served, corpus())
    for conversation, answer in zip(corpus(), answers, strict=True):
        arguments = options.call_arguments(conversation)
        expected_error = construction_error
        if expected_error is None:
            try:
                expected = renderers.build_training_sample(local, conversation["messages"], **arguments)
            except Exception as exc:
                expected_error = exc
        where = f"{conversation['id']} ({options.name})"
        if isinstance(answer, RenderError):
            exc = answer
            if expected_error is None:
                tally.mismatches.append(f"{where}: service raised {exc.code.name} {exc.details!r}")
            elif (exc.error_type, exc.details) != (
                expected_error_type(expected_error),
                expected_error_details(
                    expected_error, "chat_template_kwargs" if expected_error is construction_error else "messages"
                ),
            ):
                tally.mismatches.append(
                    f"{where}: service raised {exc.error_type} {exc.details!r}, in-process {expected_error!r}"
                )
            elif (
                not isinstance(exc, (ValueError, NotImplementedError))
                or not isinstance(exc, type(expected_error))  # what catches it in-process catches it here
                or isinstance(expected_error, NotImplementedError) != isinstance(exc, NotImplementedError)
            ):
                tally.mismatches.append(f"{where}: service raised {type(exc).__name__} for {expected_error!r}")
            else:
                tally.rejected += 1
            continue
        actual = answer
        if expected_error is not None:
            tally.mismatches.append(f"{where}: in-process raised {expected_error!r}, service did not")
            continue
        tally.samples += 1
        tally.with_media += actual.multi_modal_data is not None
        problems = sample_differences(expected, actual)
        if problems:
            tally.mismatches.append(f"{where}: {', '.join(problems)} differ")
    return tally


@pytest.fixture(scope="module", params=["2 workers", "1 worker"])
def served_by(request: pytest.FixtureRequest, client: RenderClient) -> Iterator[RenderClient]:
    """A client of the session's two-worker server, then of a one-worker server."""
    if request.param == "2 workers":
        yield client
        return
    with running_server("--workers", "1") as server, RenderClient(server.target, timeout=120) as single:
        yield single


@pytest.mark.parametrize("options", OPTIONS, ids=[options.name for options in OPTIONS])
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_service_sample_equals_in_process_sample(served_by: RenderClient, model: str, options: Options) -> None:
    tally = render_both(served_by, model, options)
    assert not tally.mismatches, f"{len(tally.mismatches)} differences:\n" + "\n".join(tally.mismatches[:20])
    assert tally.samples + tally.rejected == len(corpus())


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_samples_asked_for_all_at_once_equal_in_process(client: RenderClient, model: str) -> None:
    # The session's client coalesces calls made at once into Calls batches and holds each image's
    # tensors once: the corpus, from 16 threads, through both.
    coalescer = client._in_this_process.coalescer
    assert coalescer is not None
    batches, calls = coalescer.batches_sent, coalescer.calls_sent
    tally = render_both(client, model, OPTIONS[3], threads=16)
    assert not tally.mismatches, f"{len(tally.mismatches)} differences:\n" + "\n".join(tally.mismatches[:20])
    assert tally.samples + tally.rejected == len(corpus())
    assert coalescer.calls_sent - calls > 2 * (coalescer.batches_sent - batches), "the calls were not coalesced"


@pytest.mark.parametrize("model", ["qwen3", "qwen3-vl"])
def test_plain_unary_samples_equal_in_process(server: ServerProcess, model: str) -> None:
    # Each call alone, no image held: the path a server without Calls, or coalesce_window=None, takes.
    with RenderClient(server.target, timeout=120, coalesce_window=None, image_memory_mb=0) as plain:
        tally = render_both(plain, model, OPTIONS[1])
    assert not tally.mismatches, f"{len(tally.mismatches)} differences:\n" + "\n".join(tally.mismatches[:20])
    assert tally.samples + tally.rejected == len(corpus())


def test_the_corpus_exercises_media_and_rejections(client: RenderClient) -> None:
    # Parity over the corpus means something only if it renders images and
    # also holds conversations a renderer rejects.
    vlm = render_both(client, "qwen3-vl", OPTIONS[0])
    assert vlm.with_media >= 30 and vlm.samples > vlm.with_media
    template = render_both(client, "qwen3-template", OPTIONS[1])
    assert template.rejected > 0 and template.samples > 0


def test_text_only_samples_through_the_vlm_have_no_media_fields(client: RenderClient) -> None:
    remote = client.renderer("qwen3-vl")
    text_only = [c for c in corpus() if "images" not in c["tags"]]
    assert text_only
    for conversation in text_only:
        sample = build_training_sample(remote, conversation["messages"], tools=conversation.get("tools"))
        assert sample.multi_modal_data is None and sample.mm_token_type_ids is None, conversation["id"]
