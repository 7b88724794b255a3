"""Parity of renderers' Renderer protocol: a RemoteRenderer equals the in-process renderer.

For every default model, `client.renderer(model)` against a live render-server
answers every method of renderers' Renderer (and MultimodalRenderer) protocol
exactly as the in-process renderer of tests/reference.py does:

- render and render_ids over the whole corpus, with and without the generation
  prompt: every RenderedTokens field, value and element type, media included;
- parse_response of each assistant turn's completion, whole and cut short (in
  the reasoning, in a tool call, mid-way), with and without prompt_ids and tools;
- bridge_to_next_turn from each assistant turn to the messages after it
  (qwen3-vl with the previous turn's media carried forward);
- renderers' own build_training_sample and build_trajectory_step run on the
  remote renderer (and render_client's server-side build_training_sample);
- what a renderer declares: stop tokens, prefix stability, modality map, and
  which protocols it satisfies.

A refusal in-process is the same refusal remotely: the same exception family,
`error_type` naming the in-process type, and its message in the details. Each
test tallies the cases compared and asserts both that none differ and that the
cases cover what they claim to (media, refusals, tool calls, truncated
reasoning, ...), so none can pass by comparing nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import renderers
from google.protobuf import json_format

import render_client
from render_client import InvalidArgumentError, RenderClient, RenderError, UnimplementedError
from render_wire.errors import error_from_status
from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_parsed_response
from tests.methods import post
from tests.reference import (
    RefusedRenderer,
    deepseek_tokenizer,
    expected_error_details,
    expected_error_type,
    qwen3_tokenizer,
    reference_renderer,
    sample_differences,
)
from tests.support import DEFAULT_MODELS, ServerProcess, corpus
from tests.test_parity import OPTIONS, Options

KWARGS: dict[str, dict[str, Any] | None] = {"default": None, "enable_thinking=false": {"enable_thinking": False}}
# parse_response and bridge_to_next_turn render each assistant turn in-process
# several times over; the first conversations of the corpus hold every kind of
# turn (tool calls, reasoning, images, multi-turn tool cycles).
PROTOCOL_CONVERSATIONS = 80
DSML = "\uff5cDSML\uff5c"  # DeepSeek V4's tool-call token, with fullwidth vertical lines


# ---------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------

_SCALARS = (bool, int, float, str, bytes, type(None))


def differences(expected: Any, actual: Any, path: str = "result") -> list[str]:
    """Where `actual` differs from `expected`, recursively: the same types at every level
    (renderers' own classes, int vs bool vs float, tuple vs list, dict key order), equal
    values, and numpy arrays of the same dtype, shape and bytes."""
    if type(expected) is not type(actual):
        return [f"{path}: {type(actual).__name__} instead of {type(expected).__name__}"]
    if isinstance(expected, np.ndarray):
        if (expected.dtype, expected.shape) != (actual.dtype, actual.shape):
            return [f"{path}: {actual.dtype}{actual.shape} instead of {expected.dtype}{expected.shape}"]
        return [] if expected.tobytes() == actual.tobytes() else [f"{path}: array bytes"]
    if dataclasses.is_dataclass(expected):
        return [
            problem
            for item in dataclasses.fields(expected)
            for problem in differences(getattr(expected, item.name), getattr(actual, item.name), f"{path}.{item.name}")
        ]
    if isinstance(expected, dict):
        if list(expected) != list(actual):
            return [f"{path}: keys {list(actual)} instead of {list(expected)}"]
        return [problem for key in expected for problem in differences(expected[key], actual[key], f"{path}[{key!r}]")]
    if isinstance(expected, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{path}: {len(actual)} items instead of {len(expected)}"]
        if all(type(value) in _SCALARS for value in expected):  # token lists: at once
            if list(map(type, expected)) != list(map(type, actual)):
                return [f"{path}: element types"]
            if any(type(value) is float for value in expected):
                same = all(map(_same_scalar, expected, actual))
            else:
                same = expected == actual
            return [] if same else [f"{path}: values"]
        return [
            problem
            for index, (want, got) in enumerate(zip(expected, actual, strict=True))
            for problem in differences(want, got, f"{path}[{index}]")
        ]
    if isinstance(expected, enum.Enum):
        return [] if expected is actual else [f"{path}: {actual!r} instead of {expected!r}"]
    return [] if _same_scalar(expected, actual) else [f"{path}: {actual!r} instead of {expected!r}"]


def _same_scalar(expected: Any, actual: Any) -> bool:
    if type(expected) is float:  # nan equals nan here; -0.0 does not equal 0.0
        if math.isnan(expected):
            return math.isnan(actual)
        return expected == actual and math.copysign(1, expected) == math.copysign(1, actual)
    return bool(expected == actual)


def refusal_differences(expected: Exception, actual: RenderError, field: str) -> list[str]:
    """How the service's refusal differs from the exception the renderer raised in-process."""
    problems = []
    if actual.error_type != expected_error_type(expected):
        problems.append(f"error_type {actual.error_type!r} instead of {expected_error_type(expected)!r}")
    if not isinstance(actual, type(expected)):  # what catches it in-process catches it remotely
        problems.append(f"{type(actual).__mro__} is not a {type(expected).__name__}")
    if actual.details != expected_error_details(expected, field):
        problems.append(f"details {actual.details!r} instead of {expected_error_details(expected, field)!r}")
    # NotImplementedError is UNIMPLEMENTED; anything else INVALID_ARGUMENT (a ValueError), named by error_type.
    family = UnimplementedError if isinstance(expected, NotImplementedError) else InvalidArgumentError
    if not isinstance(actual, family) or (
        type(expected) in (ValueError, NotImplementedError) and not isinstance(actual, type(expected))
    ):
        problems.append(f"{type(actual).__name__} for {type(expected).__name__}")
    return problems


@dataclass
class Tally:
    """The cases one test compared, refused alike, and skipped; what they covered; and where they differ."""

    compared: int = 0
    refused: int = 0
    skipped: int = 0
    seen: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)

    def compare(
        self,
        where: str,
        in_process: Callable[..., Any],
        remote: Callable[..., Any],
        *args: Any,
        field: str = "messages",
        comparison: Callable[[Any, Any], list[str]] = differences,
        **kwargs: Any,
    ) -> tuple[Any, Any] | None:
        """Call both with `args` and `kwargs`; a mismatch unless both answer alike or both refuse alike
        (`field`: what the service's refusal names). Both results, when both answered."""
        try:
            expected, expected_error = in_process(*args, **kwargs), None
        except Exception as exc:
            expected, expected_error = None, exc
        try:
            actual, actual_error = remote(*args, **kwargs), None
        except RenderError as exc:
            actual, actual_error = None, exc
        if expected_error is None and actual_error is None:
            problems = comparison(expected, actual)
            if problems:
                self.mismatches.append(f"{where}: {'; '.join(problems[:5])}")
                return None
            self.compared += 1
            return expected, actual
        if expected_error is None:
            self.mismatches.append(f"{where}: service raised {type(actual_error).__name__} {actual_error.details!r}")
        elif actual_error is None:
            self.mismatches.append(f"{where}: in-process raised {expected_error!r}, the service did not")
        else:
            problems = refusal_differences(expected_error, actual_error, field)
            if problems:
                self.mismatches.append(f"{where}: {'; '.join(problems)} (in-process {expected_error!r})")
            else:
                self.refused += 1
                self.seen[f"refused {type(expected_error).__name__}"] += 1
        return None

    def check(self) -> None:
        assert not self.mismatches, f"{len(self.mismatches)} differences:\n" + "\n".join(self.mismatches[:20])


def renderers_for(client: RenderClient, model: str, kwargs: dict[str, Any] | None) -> tuple[Any, Exception | None, Any]:
    """The in-process renderer (or the exception building it raised) and the remote one."""
    try:
        local, error = reference_renderer(model, kwargs), None
    except Exception as exc:  # renderers refuses these kwargs for this model
        local, error = None, exc
    try:
        remote = client.renderer(model, chat_template_kwargs=kwargs)
    except RenderError as exc:  # ...and so does the server, at once: every call compares the refusal
        remote = RefusedRenderer(exc)
    return local, error, remote


def refusing(error: Exception) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise error

    return call


def assistant_turns(conversation: dict[str, Any]) -> list[int]:
    return [index for index, message in enumerate(conversation["messages"]) if message["role"] == "assistant"]


# ---------------------------------------------------------------------------
# 1. render, render_ids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs_name", KWARGS)
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_render_and_render_ids_equal_in_process(client: RenderClient, model: str, kwargs_name: str) -> None:
    local, construction_error, remote = renderers_for(client, model, KWARGS[kwargs_name])
    field = "messages" if construction_error is None else "chat_template_kwargs"
    tally = Tally()
    for conversation in corpus():
        messages, tools = conversation["messages"], conversation.get("tools")
        for add_generation_prompt in (False, True):
            for method in ("render", "render_ids"):
                where = f"{conversation['id']} {method}(add_generation_prompt={add_generation_prompt})"
                in_process = refusing(construction_error) if local is None else getattr(local, method)
                both = tally.compare(
                    where,
                    in_process,
                    getattr(remote, method),
                    messages,
                    tools=tools,
                    add_generation_prompt=add_generation_prompt,
                    field=field,
                )
                if both is None or method == "render_ids":
                    continue
                rendered = both[1]
                tally.seen["rendered"] += 1
                tally.seen["with -1 indices"] += -1 in rendered.message_indices
                tally.seen["with sampled_mask"] += bool(rendered.sampled_mask)
                tally.seen["without sampled_mask"] += not rendered.sampled_mask
                tally.seen["with is_content"] += bool(rendered.is_content)
                tally.seen["with tool names"] += any(name is not None for name in rendered.message_tool_names)
                tally.seen["with media"] += rendered.multi_modal_data is not None and bool(
                    rendered.multi_modal_data.mm_hashes
                )
    tally.check()
    print(
        f"\n{model} {kwargs_name}: {tally.compared} renders compared, {tally.refused} refused alike, {dict(tally.seen)}"
    )
    assert tally.compared + tally.refused == 4 * len(corpus()), tally
    if construction_error is not None:  # qwen3-vl's config has no enable_thinking: every call is refused alike
        assert tally.refused == 4 * len(corpus()), tally
        return
    assert tally.seen["rendered"] >= len(corpus()), tally  # most conversations render
    assert tally.seen["with -1 indices"] > 0 and tally.seen["with tool names"] > 0, tally
    if model == "qwen3-template":
        # DefaultRenderer leaves sampled_mask and is_content empty ("not provided"), and its
        # Jinja template refuses the corpus's list-of-parts contents.
        assert tally.seen["without sampled_mask"] == tally.seen["rendered"] and not tally.seen["with is_content"]
        assert tally.refused > 0, tally
    else:
        assert tally.seen["with sampled_mask"] == tally.seen["rendered"] and tally.seen["with is_content"] > 0
    if model == "qwen3-vl":
        assert tally.seen["with media"] >= 60, tally  # 30+ image conversations, twice (with/without prompt)


# ---------------------------------------------------------------------------
# 2. parse_response
# ---------------------------------------------------------------------------


def marker_ids(model: str) -> dict[str, int]:
    """The special tokens that open a tool call or close reasoning, as this model's tokenizer spells them."""
    tokenizer = deepseek_tokenizer() if model == "deepseek-v4" else qwen3_tokenizer()
    markers = {}
    for name in ("</think>", "<tool_call>", DSML):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            markers[name] = token_id
    return markers


def cut_points(completion: list[int], parsed: Any, markers: dict[str, int]) -> list[int]:
    """Where to cut a completion: whole, without its last token, half-way, just before the end of
    the reasoning, a few tokens into the first tool call, and in the middle of each tool call."""
    cuts = {len(completion), len(completion) - 1, len(completion) // 2}
    if markers.get("</think>") in completion:
        cuts.add(completion.index(markers["</think>"]))
    for name in ("<tool_call>", DSML):
        if markers.get(name) in completion:
            cuts.add(completion.index(markers[name]) + 3)
    for call in parsed.tool_calls[:3] if parsed is not None else ():
        if call.token_span is not None:
            cuts.add((call.token_span[0] + call.token_span[1]) // 2)
    return sorted(cut for cut in cuts if 0 < cut <= len(completion))


def turn_completion(local: Any, messages: list[Any], index: int, tools: Any) -> tuple[list[int], list[int]] | str:
    """The prompt before assistant turn `index` and the tokens the model sampled for it, in-process;
    why not, when the renderer refuses the conversation or the full render does not extend the prompt."""
    try:
        prompt = local.render_ids(messages[:index], tools=tools, add_generation_prompt=True)
        full = local.render_ids(messages[: index + 1], tools=tools)
    except Exception:  # refused: test_render_and_render_ids_equal_in_process compares that
        return "skipped: refused"
    if full[: len(prompt)] != prompt or len(full) == len(prompt):
        # e.g. without thinking, Qwen3's generation prompt ends in an empty think block that a
        # turn with reasoning_content does not render
        return "skipped: not a prefix"
    return prompt, full[len(prompt) :]


def parsed_features(parsed: Any) -> Iterator[str]:
    yield "parsed"
    yield f"reasoning_complete={parsed.reasoning_complete}"
    if parsed.reasoning_content is None:
        yield "reasoning_content None"
    else:
        yield "reasoning_content text" if parsed.reasoning_content else "reasoning_content empty"
    if parsed.tool_calls:
        yield "with tool calls"
    for call in parsed.tool_calls:
        yield f"status {call.status.value}"
        yield f"arguments {type(call.arguments).__name__}"
        yield "token_span" if call.token_span is not None else "no token_span"
        if isinstance(call.arguments, dict) and any(
            type(value) in (int, float, bool) for value in call.arguments.values()
        ):
            yield "numeric arguments"


@pytest.mark.parametrize("kwargs_name", KWARGS)
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_parse_response_equals_in_process(client: RenderClient, model: str, kwargs_name: str) -> None:
    local, construction_error, remote = renderers_for(client, model, KWARGS[kwargs_name])
    if construction_error is not None:
        pytest.skip(f"{model} does not take {kwargs_name}: test_declarations_equal_in_process compares the refusal")
    markers = marker_ids(model)
    tally = Tally()
    # An empty completion, with and without an (empty) prompt.
    for prompt_ids in (None, []):
        tally.compare(
            f"[] prompt_ids={prompt_ids}",
            local.parse_response,
            remote.parse_response,
            [],
            prompt_ids=prompt_ids,
            field="token_ids",
        )
    for conversation in corpus()[:PROTOCOL_CONVERSATIONS]:
        messages, tools = conversation["messages"], conversation.get("tools")
        for index in assistant_turns(conversation):
            turn = turn_completion(local, messages, index, tools)
            if isinstance(turn, str):
                tally.skipped += 1
                tally.seen[turn] += 1
                continue
            prompt, completion = turn
            try:
                whole = local.parse_response(completion, tools=tools, prompt_ids=prompt)
            except Exception:
                whole = None  # compared below all the same
            for cut in cut_points(completion, whole, markers):
                for prompt_ids in (None, prompt):
                    for with_tools in (None, tools) if tools else (None,):
                        where = (
                            f"{conversation['id']}[{index}] completion[:{cut}] of {len(completion)}"
                            f" prompt_ids={'yes' if prompt_ids else 'no'} tools={'yes' if with_tools else 'no'}"
                        )
                        both = tally.compare(
                            where,
                            local.parse_response,
                            remote.parse_response,
                            completion[:cut],
                            tools=with_tools,
                            prompt_ids=prompt_ids,
                            field="token_ids",
                        )
                        if both is not None:
                            tally.seen.update(parsed_features(both[1]))
    tally.check()
    print(
        f"\n{model} {kwargs_name}: {tally.compared} parses compared, {tally.skipped} turns skipped, {dict(tally.seen)}"
    )
    # (Only DefaultRenderer's Jinja template refuses conversations: those with list-of-parts contents.)
    assert tally.compared >= 400 and (tally.seen["skipped: refused"] == 0 or model == "qwen3-template"), tally
    if model == "qwen3-template":
        # DefaultRenderer has no tool parser for Qwen3's template: tool calls stay in the content.
        assert tally.seen["with tool calls"] == 0, tally
    else:
        # Whole tool calls, and tool calls cut open or cut inside their JSON.
        assert tally.seen["status ok"] > 0 and tally.seen["status unclosed_block"] > 0, tally
        assert tally.seen["token_span"] > 0 and tally.seen["arguments NoneType"] + tally.seen["numeric arguments"] > 0
        if model != "deepseek-v4":  # DSML parameters are not JSON: a cut one is unclosed, never invalid JSON
            assert tally.seen["status invalid_json"] > 0, tally
    assert tally.seen["reasoning_complete=True"] + tally.seen["reasoning_complete=None"] > 0, tally
    if (model, kwargs_name) in (("qwen3", "default"), ("deepseek-v4", "default"), ("qwen3-template", "default")):
        # Completions cut before </think>: reasoning left open. (Qwen3-VL renders no reasoning; without
        # thinking Qwen3's generation prompt closes an empty think block, so completions hold none.)
        assert tally.seen["reasoning_complete=False"] > 0 and tally.seen["reasoning_content text"] > 0, tally
    if model == "qwen3-template" and kwargs_name != "default":
        assert tally.seen["reasoning_complete=None"] > 0, tally  # the template parser cannot tell
    else:
        assert tally.seen["reasoning_content None"] > 0 or model == "qwen3-template", tally


# What a model may emit that the corpus's well-formed turns do not hold: arguments that are a
# string, a number, a list or null; floats JSON cannot spell (1e400, NaN); big ints; -0.0; key
# order; duplicate keys; lone surrogates from "\\ud800" escapes; a missing name; broken JSON.
QWEN_COMPLETIONS = [
    '<tool_call>\n{"name": "f", "arguments": "x"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": 7}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": [1, "two"]}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": null}\n</tool_call>',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n["not", "an", "object"]\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1.0, "b": 1e400, "c": -0.0, "d": 123456789012345678901234567890,'
    ' "e": [1, 2.5, true, null, "é"], "f": {"z": 1, "a": 2}}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": NaN, "b": -Infinity}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "a": 2}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"q": "\\ud800", "\\udc00": 1}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": "\\ud83d"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g"',
    "<think>\nreasoning never closed",
    "answer</think> after",
]
DEEPSEEK_COMPLETIONS = [
    f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
    f'<{DSML}parameter name="a" string="false">1e400</{DSML}parameter>\n'
    f'<{DSML}parameter name="b" string="false">NaN</{DSML}parameter>\n'
    f'<{DSML}parameter name="c" string="false">123456789012345678901234567890</{DSML}parameter>\n'
    f'<{DSML}parameter name="d" string="false">1.0</{DSML}parameter>\n'
    f'<{DSML}parameter name="e" string="true">1.0</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}tool_calls>",
    f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
    f'<{DSML}parameter name="a" string="false">"\\ud800"</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}tool_calls>",
    f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n'
    f'<{DSML}parameter name="a" string="false">{{"x": 1, "x": 2}}</{DSML}parameter>\n'
    f'<{DSML}parameter name="b" string="false">{{bad</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}tool_calls>",
    f"<{DSML}tool_calls>\n<{DSML}invoke>\n</{DSML}invoke>\n</{DSML}tool_calls>",
    f'<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="a" string="true">open',
    "reasoning</think>answer",
]


def completion_ids(model: str, text: str, local: Any) -> list[int]:
    tokenizer = deepseek_tokenizer() if model == "deepseek-v4" else qwen3_tokenizer()
    return [*tokenizer.encode(text, add_special_tokens=False), local.get_stop_token_ids()[0]]


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_parse_response_of_unusual_completions_equals_in_process(client: RenderClient, model: str) -> None:
    local, _, remote = renderers_for(client, model, None)
    tally = Tally()
    for text in DEEPSEEK_COMPLETIONS if model == "deepseek-v4" else QWEN_COMPLETIONS:
        ids = completion_ids(model, text, local)
        for cut in (len(ids), len(ids) - 1):
            both = tally.compare(
                f"{text!r}[:{cut}]", local.parse_response, remote.parse_response, ids[:cut], field="token_ids"
            )
            if both is not None:
                tally.seen.update(parsed_features(both[1]))
    tally.check()
    print(f"\n{model}: {tally.compared} parses compared, {dict(tally.seen)}")
    assert tally.compared == 2 * len(DEEPSEEK_COMPLETIONS if model == "deepseek-v4" else QWEN_COMPLETIONS)
    if model != "qwen3-template":
        assert tally.seen["arguments dict"] > 0 and tally.seen["status missing_name"] > 0, tally
        assert tally.seen["status invalid_json"] + tally.seen["status malformed_structure"] > 0, tally
    if model in ("qwen3", "qwen3-vl"):
        for kind in ("str", "int", "list", "NoneType"):
            assert tally.seen[f"arguments {kind}"] > 0, (kind, tally)


# What a model may write where a tool call's name goes: hermes-style parsers hand back what json.loads
# made of it (a number, a list, an object, a bool, a lone surrogate...); DSML's are the attribute's text.
SAMPLED_NAMES = [
    "123", '["add"]', '{"f": [1, "\\ud800"]}', "true", "false", '"\\ud800"', '"\\udc00x"', "null", "0", '""',
    "1.5", "-0.0", "1e400", "12345678901234567890123", '"\\ud83d\\ude00"', '"add"',
]  # fmt: skip
DSML_NAMES = ["123", '["add"]', "", " ", "\\ud800", "add"]


def sampled_name_completions(model: str) -> list[str]:
    if model == "deepseek-v4":
        return [
            f'<{DSML}tool_calls>\n<{DSML}invoke name="{name}">\n'
            f'<{DSML}parameter name="a" string="true">1</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>'
            for name in DSML_NAMES
        ]
    return [f'<tool_call>\n{{"name": {name}, "arguments": {{"a": 1}}}}\n</tool_call>' for name in SAMPLED_NAMES]


def has_lone_surrogate(value: Any) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in json.dumps(value, ensure_ascii=False))


def parse_over_json(server: ServerProcess, model: str) -> Callable[..., Any]:
    """parse_response through the HTTP port's /v1/parse_response, decoded as the client decodes gRPC's."""

    def parse(token_ids: list[int]) -> Any:
        status, answer = post(
            server.http, "/v1/parse_response", json.dumps({"model": model, "token_ids": token_ids}).encode()
        )
        if status != 200:
            raise error_from_status(grpc.StatusCode[answer["code"]], answer["message"], answer.get("error_type"))
        return decode_parsed_response(json_format.ParseDict(answer, pb.ParseResponseResponse()))

    return parse


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_parse_response_of_sampled_tool_call_names_equals_in_process(
    server: ServerProcess, client: RenderClient, model: str
) -> None:
    """A completion whose tool call names no string comes back as in-process, over gRPC and JSON.

    Before, ParsedToolCall.name was a proto string: the server answered INTERNAL (HTTP 500)."""
    local, _, remote = renderers_for(client, model, None)
    tally = Tally()
    for text in sampled_name_completions(model):
        ids = completion_ids(model, text, local)
        for transport, parse in (("gRPC", remote.parse_response), ("JSON", parse_over_json(server, model))):
            both = tally.compare(f"{transport} {text!r}", local.parse_response, parse, ids, field="token_ids")
            if both is not None and transport == "gRPC":
                for call in both[1].tool_calls:
                    tally.seen[f"name {type(call.name).__name__}"] += 1
                    tally.seen["name with a lone surrogate"] += has_lone_surrogate(call.name)
    tally.check()
    print(f"\n{model}: {tally.compared} parses compared, {dict(tally.seen)}")
    assert tally.compared == 2 * len(sampled_name_completions(model))
    if model in ("qwen3", "qwen3-vl"):
        for kind in ("int", "list", "dict", "bool", "float", "NoneType", "str", "with a lone surrogate"):
            assert tally.seen[f"name {kind}"] > 0, (kind, tally)


# ---------------------------------------------------------------------------
# 3. bridge_to_next_turn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_bridge_to_next_turn_equals_in_process(client: RenderClient, model: str) -> None:
    local, _, remote = renderers_for(client, model, None)
    multimodal = renderers.is_multimodal(local)
    tally = Tally()
    for conversation in corpus()[:PROTOCOL_CONVERSATIONS]:
        messages, tools = conversation["messages"], conversation.get("tools")
        turns = assistant_turns(conversation)
        for index, next_turn in itertools.pairwise(turns):
            new_messages = messages[index + 1 : next_turn]
            if not new_messages:
                continue
            turn = turn_completion(local, messages, index, tools)
            if isinstance(turn, str):
                tally.skipped += 1
                tally.seen[turn] += 1
                continue
            prompt, completion = turn
            media_choices: list[Any] = [None]
            if multimodal:
                prompt_media = local.render(messages[:index], tools=tools, add_generation_prompt=True).multi_modal_data
                if prompt_media is not None:
                    media_choices.append(prompt_media)
            # The whole turn, one cut off before its end (a truncated sample), and the whole turn
            # followed by the next assistant message too (which bridges refuse to re-tokenize).
            cases = [
                (completion, new_messages),
                (completion[:-1], new_messages),
                (completion, messages[index + 1 : next_turn + 1]),
            ]
            for sampled, added in cases:
                for media in media_choices:
                    extra = {"previous_multi_modal_data": media} if multimodal else {}
                    where = (
                        f"{conversation['id']}[{index}] {len(added)} new messages, {len(sampled)} sampled"
                        f" of {len(completion)}{', previous media' if media is not None else ''}"
                    )
                    both = tally.compare(
                        where,
                        local.bridge_to_next_turn,
                        remote.bridge_to_next_turn,
                        prompt,
                        sampled,
                        added,
                        tools=tools,
                        **extra,
                        field="new_messages",
                    )
                    if both is None:
                        continue
                    bridged = both[1]
                    tally.seen["None" if bridged is None else "bridged"] += 1
                    if bridged is not None and bridged.multi_modal_data is not None:
                        tally.seen["bridged with media"] += bool(bridged.multi_modal_data.mm_hashes)
                        if media is not None and media.mm_hashes:
                            tally.seen["media carried forward"] += 1
    tally.check()
    print(f"\n{model}: {tally.compared} bridges compared, {tally.skipped} turns skipped, {dict(tally.seen)}")
    assert tally.compared >= 150 and tally.seen["skipped: not a prefix"] == 0, tally
    assert tally.seen["None"] > 0, tally
    if model == "qwen3-template":
        assert tally.seen["bridged"] == 0, tally  # DefaultRenderer never bridges
    else:
        assert tally.seen["bridged"] > 0, tally
    if model == "qwen3-vl":
        assert tally.seen["media carried forward"] > 0, tally


# ---------------------------------------------------------------------------
# 3b. all of them at once: coalesced batches, images held
# ---------------------------------------------------------------------------


def concurrent_cases(local: Any, multimodal: bool) -> list[tuple[str, str, tuple[Any, ...], dict[str, Any]]]:
    """(where, method, args, kwargs) for render, render_ids, parse_response and bridge_to_next_turn
    over the first conversations of the corpus: what a rollout worker's threads ask at once."""
    cases = []
    for conversation in corpus()[:PROTOCOL_CONVERSATIONS]:
        messages, tools = conversation["messages"], conversation.get("tools")
        name = conversation["id"]
        cases.append((f"{name} render", "render", (messages,), {"tools": tools, "add_generation_prompt": True}))
        cases.append((f"{name} render_ids", "render_ids", (messages,), {"tools": tools}))
        turns = assistant_turns(conversation)
        for index, following in itertools.zip_longest(turns, turns[1:]):
            turn = turn_completion(local, messages, index, tools)
            if isinstance(turn, str):
                continue
            prompt, completion = turn
            where = f"{name}[{index}]"
            cases.append((f"{where} parse", "parse_response", (completion,), {"tools": tools, "prompt_ids": prompt}))
            new_messages = messages[index + 1 : following]
            if not new_messages:
                continue
            extra = {}
            if multimodal:
                media = local.render(messages[:index], tools=tools, add_generation_prompt=True).multi_modal_data
                extra = {"previous_multi_modal_data": media}
            bridge = (prompt, completion, new_messages)
            cases.append((f"{where} bridge", "bridge_to_next_turn", bridge, {"tools": tools, **extra}))
    return cases


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_every_method_called_from_many_threads_at_once_equals_in_process(client: RenderClient, model: str) -> None:
    # The session's client coalesces calls made at once into Calls batches, and holds each image's
    # tensors once (the corpus's images repeat across these calls): both paths, held to in-process.
    local, _, remote = renderers_for(client, model, None)
    cases = concurrent_cases(local, renderers.is_multimodal(local))

    def remotely(case: tuple[str, str, tuple[Any, ...], dict[str, Any]]) -> tuple[Any, RenderError | None]:
        _, method, args, kwargs = case
        try:
            return getattr(remote, method)(*args, **kwargs), None
        except RenderError as exc:
            return None, exc

    coalescer = client._in_this_process.coalescer
    assert coalescer is not None
    batches, calls = coalescer.batches_sent, coalescer.calls_sent
    with ThreadPoolExecutor(16) as threads:
        answers = list(threads.map(remotely, cases))
    assert coalescer.calls_sent - calls > 2 * (coalescer.batches_sent - batches), "the calls were not coalesced"
    tally = Tally()
    for (where, method, args, kwargs), (answer, error) in zip(cases, answers, strict=True):

        def answered(*_: Any, answer: Any = answer, error: RenderError | None = error, **__: Any) -> Any:
            if error is not None:
                raise error
            return answer

        field = {"parse_response": "token_ids", "bridge_to_next_turn": "new_messages"}.get(method, "messages")
        tally.compare(where, getattr(local, method), answered, *args, field=field, **kwargs)
        tally.seen[method] += 1
    tally.check()
    print(f"\n{model}: {tally.compared} calls compared, {tally.refused} refused alike, {dict(tally.seen)}")
    assert tally.compared >= len(cases) // 2 and min(tally.seen.values()) > 0, tally


# Messages some renderers refuse (or render) that the corpus does not hold.
def odd_messages() -> dict[str, dict[str, Any]]:
    image = next(
        part
        for conversation in corpus()
        for message in conversation["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    )
    return {
        "video part": {"role": "user", "content": [{"type": "video", "video": "data:video/mp4;base64,AAAA"}]},
        "None content": {"role": "user", "content": None},
        "empty content": {"role": "user", "content": ""},
        "thinking part": {"role": "user", "content": [{"type": "thinking", "thinking": "hm"}]},
        "image part": {"role": "user", "content": [{"type": "text", "text": "See:"}, image]},
        "tool without id": {"role": "tool", "content": [{"type": "text", "text": "a"}]},
    }


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_odd_messages_render_and_bridge_alike(client: RenderClient, model: str) -> None:
    local, _, remote = renderers_for(client, model, None)
    extra = {"previous_multi_modal_data": None} if renderers.is_multimodal(local) else {}
    opening = [{"role": "user", "content": "Hi."}]
    prompt = local.render_ids(opening, add_generation_prompt=True)
    completion = local.render_ids([*opening, {"role": "assistant", "content": "Hello."}])[len(prompt) :]
    tally = Tally()
    for name, message in odd_messages().items():
        messages = [*opening, {"role": "assistant", "content": "Hello."}, message]
        for method in ("render", "render_ids"):
            tally.compare(f"{name} {method}", getattr(local, method), getattr(remote, method), messages)
        tally.compare(
            f"{name} bridge_to_next_turn",
            local.bridge_to_next_turn,
            remote.bridge_to_next_turn,
            prompt,
            completion,
            [message],
            **extra,
            field="new_messages",
        )
    print(f"\n{model}: {tally.compared} compared, {tally.refused} refused alike, {dict(tally.seen)}")
    tally.check()
    assert tally.compared + tally.refused == 3 * len(odd_messages())
    if model == "qwen3-vl":
        assert tally.seen["refused NotImplementedError"] > 0, tally  # video parts, in renderers 0.1.12


def test_messages_the_wire_cannot_carry_are_refused_by_name(client: RenderClient) -> None:
    # The wire carries content as a str, None, or a list of known parts; anything else is refused
    # before it is sent, naming the field, whatever the renderer would have done with it in-process.
    remote = client.renderer("qwen3")
    opening = [{"role": "user", "content": "Hi."}]
    for content, problem in ((5, "expected a str"), ([{"type": "audio", "audio": "x"}], "unsupported content part")):
        with pytest.raises(InvalidArgumentError, match=rf"^messages\[1\]\.content.*{problem}") as refused:
            remote.render([*opening, {"role": "user", "content": content}])
        assert refused.value.error_type is None
        with pytest.raises(InvalidArgumentError, match=rf"^new_messages\[0\]\.content.*{problem}"):
            remote.bridge_to_next_turn([1, 2], [3], [{"role": "user", "content": content}])


# ---------------------------------------------------------------------------
# 4. renderers' helpers on the remote renderer
# ---------------------------------------------------------------------------


def sample_comparison(expected_class: type) -> Callable[[Any, Any], list[str]]:
    def compare(expected: Any, actual: Any) -> list[str]:
        problems = sample_differences(expected, actual)
        if type(actual) is not expected_class:
            problems.append(f"{type(actual).__name__} instead of {expected_class.__name__}")
        return problems

    return compare


@pytest.mark.parametrize("options", OPTIONS, ids=[options.name for options in OPTIONS])
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_renderers_build_training_sample_on_the_remote_renderer(
    client: RenderClient, model: str, options: Options
) -> None:
    local, construction_error, remote = renderers_for(client, model, options.chat_template_kwargs)
    field = "messages" if construction_error is None else "chat_template_kwargs"
    in_process = (
        refusing(construction_error) if local is None else functools.partial(renderers.build_training_sample, local)
    )
    tally = Tally()
    # test_parity holds render_client's build_training_sample to in-process over the whole corpus,
    # and test_render_and_render_ids_equal_in_process the render it is made from: a part suffices.
    conversations = corpus()[:PROTOCOL_CONVERSATIONS]
    for conversation in conversations:
        messages = conversation["messages"]
        arguments = options.call_arguments(conversation)
        where = f"{conversation['id']} ({options.name})"
        # renderers' build_training_sample over the protocol: the errors of its own code (ValueError)
        # it raises in this process as in-process; the renderer's come back as RenderErrors.
        try:
            own_error = None
            both = tally.compare(
                f"{where} renderers.build_training_sample(remote)",
                in_process,
                functools.partial(renderers.build_training_sample, remote),
                messages,
                **arguments,
                field=field,
                comparison=sample_comparison(renderers.RenderedTrainingSample),
            )
            tally.seen["with media"] += both is not None and both[1].multi_modal_data is not None
        except Exception as exc:  # not a RenderError: raised by renderers' code itself
            own_error = exc
        if own_error is not None:
            try:
                in_process(messages, **arguments)
                tally.mismatches.append(f"{where}: over the protocol raised {own_error!r}, in-process did not")
            except Exception as exc:
                if (type(exc), str(exc)) != (type(own_error), str(own_error)):
                    tally.mismatches.append(f"{where}: over the protocol raised {own_error!r}, in-process {exc!r}")
                else:
                    tally.refused += 1
                    tally.seen["renderers' own refusal"] += 1
        # render_client's: the whole sample built on the server.
        tally.compare(
            f"{where} render_client.build_training_sample(remote)",
            in_process,
            functools.partial(render_client.build_training_sample, remote),
            messages,
            **arguments,
            field=field,
            comparison=sample_comparison(render_client.RenderedTrainingSample),
        )
    tally.check()
    print(
        f"\n{model} {options.name}: {tally.compared} samples compared, {tally.refused} refused alike, {dict(tally.seen)}"
    )
    assert tally.compared + tally.refused == 2 * len(conversations), tally
    if construction_error is not None:
        assert tally.refused == 2 * len(conversations), tally
    elif model != "qwen3-template" or options.role_to_mask is not None:
        # (DefaultRenderer refuses role_to_mask=None: it has no sampled_mask)
        assert tally.compared > len(conversations), tally
    if model == "qwen3-vl" and construction_error is None:
        assert tally.seen["with media"] >= 10, tally


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_renderers_build_trajectory_step_on_the_remote_renderer(client: RenderClient, model: str) -> None:
    local, _, remote = renderers_for(client, model, None)
    tally = Tally()
    for conversation in corpus()[:PROTOCOL_CONVERSATIONS]:
        messages, tools = conversation["messages"], conversation.get("tools")
        steps = [(index, [messages[index]]) for index in assistant_turns(conversation)]
        steps.append((len(messages), []))  # no completion: the whole conversation as the prompt
        for index, completion_messages in steps:
            both = tally.compare(
                f"{conversation['id']}[:{index}] + {len(completion_messages)}",
                functools.partial(renderers.build_trajectory_step, local),
                functools.partial(renderers.build_trajectory_step, remote),
                messages[:index],
                completion_messages,
                tools=tools,
            )
            if both is not None:
                tally.seen["with media"] += "multi_modal_data" in both[1]
                tally.seen["with completion"] += bool(both[1]["completion_ids"])
    tally.check()
    print(f"\n{model}: {tally.compared} trajectory steps compared, {tally.refused} refused alike, {dict(tally.seen)}")
    assert tally.compared >= 150, tally
    assert tally.seen["with completion"] > 0, tally
    if model == "qwen3-vl":
        assert tally.seen["with media"] > 0, tally
    if model == "qwen3-template":
        assert tally.refused > 0, tally


# ---------------------------------------------------------------------------
# 5. What a renderer declares
# ---------------------------------------------------------------------------


def declarations(renderer: Any) -> dict[str, Any]:
    declared = {
        "get_stop_token_ids()": renderer.get_stop_token_ids(),
        "is_prefix_stable": renderer.is_prefix_stable,
        "is_multimodal": renderers.is_multimodal(renderer),
        "isinstance Renderer": isinstance(renderer, renderers.Renderer),
        "isinstance MultimodalRenderer": isinstance(renderer, renderers.MultimodalRenderer),
        "has mm_token_type_id_map": hasattr(type(renderer), "mm_token_type_id_map"),
    }
    if declared["has mm_token_type_id_map"]:
        declared["mm_token_type_id_map"] = renderer.mm_token_type_id_map
    return declared


@pytest.mark.parametrize("kwargs_name", KWARGS)
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_declarations_equal_in_process(client: RenderClient, model: str, kwargs_name: str) -> None:
    local, construction_error, remote = renderers_for(client, model, KWARGS[kwargs_name])
    tally = Tally()
    both = tally.compare(
        f"{model} {kwargs_name}",
        refusing(construction_error) if local is None else functools.partial(declarations, local),
        functools.partial(declarations, remote),
        field="chat_template_kwargs",
    )
    tally.check()
    if construction_error is None:
        assert both is not None
        declared = both[1]
        assert declared["get_stop_token_ids()"] and declared["isinstance Renderer"]
        assert declared["isinstance MultimodalRenderer"] == declared["is_multimodal"] == (model == "qwen3-vl")
        if model == "qwen3-vl":
            assert declared["mm_token_type_id_map"]
    else:
        assert tally.refused == 1
