"""The remote renderer is the in-process renderer's twin: attributes, class, guards, threads, asyncio.

For every default model (and chat-template kwargs), `client.renderer(model)` is
compared with the renderer renderers builds in process for the config the
registry declares: every public attribute and property of the in-process
object has the same value on the remote one (`config` as renderers' own config
object, with the same fields set), its class is a subclass of the in-process
class (so renderers' dispatch by class picks the same branch), and every other
member of that class raises AttributeError saying it is not served. Then one
remote renderer is called from many threads at once, with no lock, and the
asyncio renderer's awaitable methods are held to in-process too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import pickle
import threading
import tomllib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import renderers
import renderers.client

from render_client import AsyncRemoteRenderer, RenderClient, RenderError, aio
from render_client.aio import AsyncRenderClient
from render_server.config import DEFAULT_CONFIG_PATH
from tests.reference import qwen3_tokenizer, qwen3_vl_processor, reference_renderer, sample_differences
from tests.support import DEFAULT_MODELS, ServerProcess, corpus

KWARGS: dict[str, dict[str, Any] | None] = {
    "no kwargs": None,
    "enable_thinking=false": {"enable_thinking": False},
    "add_vision_id=true": {"add_vision_id": True},
}
# The members renderers' Renderer / MultimodalRenderer protocol names: served by calls.
PROTOCOL = {"render", "render_ids", "parse_response", "bridge_to_next_turn", "get_stop_token_ids"}


def registry_options(model: str) -> dict[str, Any]:
    """The renderer_options the default registry builds `model` with (read from the file, not the server)."""
    table = tomllib.loads(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))["models"][model]
    return dict(table.get("renderer_options", {}))


def in_process(model: str, kwargs: dict[str, Any] | None) -> Any:
    """The renderer a trainer builds in process for the registry's config of `model`."""
    options = registry_options(model)
    if not options:
        return reference_renderer(model, kwargs)
    assert model == "qwen3-vl", model
    config = renderers.merge_chat_template_kwargs(renderers.Qwen3VLRendererConfig(**options), kwargs)
    return renderers.Qwen3VLRenderer(qwen3_tokenizer(), config, processor=qwen3_vl_processor())


def public_data(renderer: Any) -> dict[str, Any]:
    """Every public attribute and property of an in-process renderer that is not a method."""
    return {
        name: getattr(renderer, name)
        for name in dir(renderer)
        if not name.startswith("_") and not inspect.ismethod(getattr(renderer, name))
    }


def both(client: RenderClient, model: str, kwargs: dict[str, Any] | None) -> tuple[Any, Any]:
    """(in-process, remote), or pytest.skip where renderers refuses the kwargs for the model (alike)."""
    try:
        local = in_process(model, kwargs)
    except ValueError as refusal:
        with pytest.raises(RenderError) as remote_refusal:
            client.renderer(model, chat_template_kwargs=kwargs)
        assert isinstance(remote_refusal.value, type(refusal))
        pytest.skip(f"renderers refuses {kwargs} for {model}, in process and remotely")
    return local, client.renderer(model, chat_template_kwargs=kwargs)


@pytest.mark.parametrize("kwargs_name", KWARGS)
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_every_public_attribute_has_the_in_process_value(client: RenderClient, model: str, kwargs_name: str) -> None:
    local, remote = both(client, model, KWARGS[kwargs_name])
    expected = public_data(local)
    assert {"config", "is_prefix_stable", "effective_thinking_retention"} <= set(expected)
    for name, value in expected.items():
        assert getattr(remote, name) == value, name
        assert type(getattr(remote, name)) is type(value), name
    # The config is renderers' own object: the same class, values and fields set (merging
    # more kwargs into it, or model_copy, gives what it gives in process).
    assert type(remote.config) is type(local.config)
    assert remote.config.model_fields_set == local.config.model_fields_set
    assert remote.config.model_copy(update={"thinking_retention": "all"}) == local.config.model_copy(
        update={"thinking_retention": "all"}
    )
    # What renderers' helpers read off a renderer with getattr(renderer, name, default).
    for name in ("supports_tools", "supports_process_multimodal", "supports_multimodal_bridge", "is_multimodal"):
        assert getattr(remote, name, "absent") == getattr(local, name, "absent"), name
    # prime-rl hands an in-process VLM renderer its processor when it has a _processor; the
    # remote one has none to set (the server's renderer has its own).
    assert not hasattr(remote, "_processor")
    # The protocol methods are there, and are the remote ones.
    for name in PROTOCOL:
        assert callable(getattr(remote, name)) and callable(getattr(local, name))
    assert remote.get_stop_token_ids() == local.get_stop_token_ids()


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_the_remote_renderer_is_taken_for_the_renderer_it_stands_for(client: RenderClient, model: str) -> None:
    local, remote = both(client, model, None)
    assert isinstance(remote, type(local)) and type(remote).__name__ == type(local).__name__
    assert issubclass(type(remote), type(local))
    assert renderers.is_multimodal(remote) == renderers.is_multimodal(local) == (model == "qwen3-vl")
    assert isinstance(remote, renderers.Renderer)
    assert isinstance(remote, renderers.MultimodalRenderer) == isinstance(local, renderers.MultimodalRenderer)
    # renderers.client's feature encoders are picked by class: the same branch is taken (here it
    # stops where vLLM would be needed, for qwen3-vl; a text renderer has none).
    media = renderers.MultiModalData(mm_hashes={"image": ["x"]})
    outcomes = []
    for renderer in (local, remote):
        with pytest.raises(Exception) as raised:
            renderers.client._build_mm_features(renderer, media)
        outcomes.append((type(raised.value), str(raised.value).replace(type(renderer).__name__, "?")))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][0] is RuntimeError) == (model == "qwen3-vl"), outcomes


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_members_the_server_does_not_serve_raise_a_clear_error(client: RenderClient, model: str) -> None:
    local, remote = both(client, model, None)
    unserved = [
        name
        for klass in type(local).__mro__[:-1]
        for name in vars(klass)
        if not (name.startswith("__") and name.endswith("__"))
        and name not in PROTOCOL
        and name not in public_data(local)
    ]
    assert unserved, "a renderer class with nothing but its protocol"
    for name in unserved:  # e.g. _encode, _token_id, _render_assistant: they need the tokenizer
        with pytest.raises(AttributeError, match=f"{name} is not served remotely"):
            getattr(remote, name)
    # Its instance state is not here either, and nothing can be set on it.
    for name in ("_tokenizer", "_processor", "_image_cache"):
        assert not hasattr(remote, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        remote._tokenizer = qwen3_tokenizer()
    # The class itself still answers for the class it stands for (introspection).
    for name in unserved:
        assert getattr(type(remote), name) is getattr(type(local), name)


def test_kwargs_the_renderer_refuses_raise_at_once_as_in_process(client: RenderClient) -> None:
    import pydantic

    for kwargs in ({"enable_thinking": "maybe"}, {"no_such_kwarg": True}):
        with pytest.raises(ValueError) as in_process_refusal:
            reference_renderer("qwen3", kwargs)
        with pytest.raises(RenderError) as remote_refusal:
            client.renderer("qwen3", chat_template_kwargs=kwargs)
        # pydantic's ValidationError comes back as one, with its errors; ValueError as a ValueError.
        assert isinstance(remote_refusal.value, type(in_process_refusal.value))
        if isinstance(in_process_refusal.value, pydantic.ValidationError):
            assert isinstance(remote_refusal.value, pydantic.ValidationError)
            assert remote_refusal.value.errors() == in_process_refusal.value.errors()


def test_a_template_error_comes_back_as_jinja2_s(client: RenderClient) -> None:
    import jinja2

    # DefaultRenderer's Jinja template refuses list-of-parts content: jinja2 raises it in process.
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(jinja2.TemplateError) as in_process_error:
        reference_renderer("qwen3-template").render(messages)
    with pytest.raises(jinja2.TemplateError) as remote_error:
        client.renderer("qwen3-template").render(messages)
    assert type(in_process_error.value) in type(remote_error.value).__mro__
    assert remote_error.value.error_type == f"jinja2.exceptions.{type(in_process_error.value).__name__}"


@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_a_pickled_remote_renderer_is_still_the_twin(client: RenderClient, model: str) -> None:
    local, remote = both(client, model, {"enable_thinking": False} if model != "qwen3-vl" else None)
    copy = pickle.loads(pickle.dumps(remote))
    assert type(copy) is type(remote) and isinstance(copy, type(local))
    assert copy.config == local.config and copy.config.model_fields_set == local.config.model_fields_set
    assert public_data(local) == {name: getattr(copy, name) for name in public_data(local)}


# ---------------------------------------------------------------------------
# Many threads, no lock
# ---------------------------------------------------------------------------


def protocol_calls(model: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Render, render_ids, parse_response and bridge_to_next_turn calls over the corpus."""
    local = reference_renderer(model)
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    for conversation in corpus()[:40]:
        messages, tools = conversation["messages"], conversation.get("tools")
        try:
            prompt = local.render_ids(messages[:1], tools=tools, add_generation_prompt=True)
            whole = local.render_ids(messages, tools=tools)
        except Exception:
            continue
        completion = whole[len(prompt) :] if whole[: len(prompt)] == prompt else whole[-20:]
        calls += [
            ("render", (messages,), {"tools": tools}),
            ("render_ids", (messages,), {"tools": tools, "add_generation_prompt": True}),
            ("parse_response", (completion,), {"tools": tools, "prompt_ids": prompt}),
            ("bridge_to_next_turn", (prompt, completion, [{"role": "user", "content": "And then?"}]), {"tools": tools}),
        ]
    return calls


def test_one_remote_renderer_serves_many_threads_at_once_without_a_lock(server: ServerProcess) -> None:
    calls = protocol_calls("qwen3")
    assert len(calls) >= 100
    local = reference_renderer("qwen3")
    expected = [getattr(local, method)(*args, **kwargs) for method, args, kwargs in calls]
    with RenderClient(server.target, timeout=120, connections=2) as client:
        remote = client.renderer("qwen3")
        start = threading.Barrier(16)
        in_flight = [0, 0]  # now, most at once
        counting = threading.Lock()  # the test's count only; the calls take no lock

        def call(index: int) -> Any:
            if index < 16:
                start.wait(timeout=60)  # the first sixteen calls start together
            method, args, kwargs = calls[index]
            with counting:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
            try:
                return getattr(remote, method)(*args, **kwargs)
            finally:
                with counting:
                    in_flight[0] -= 1

        with ThreadPoolExecutor(16) as threads:
            results = list(threads.map(call, range(len(calls))))
    assert in_flight[1] > 1  # calls did overlap
    for (method, _, _), want, got in zip(calls, expected, results, strict=True):
        assert got == want, method


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


def test_the_asyncio_renderer_awaits_the_protocol_with_in_process_results(server: ServerProcess) -> None:
    calls = protocol_calls("qwen3")[:80]
    local = reference_renderer("qwen3", {"enable_thinking": False})
    expected = [getattr(local, method)(*args, **kwargs) for method, args, kwargs in calls]
    image = next(c for c in corpus() if "images" in c["tags"])["messages"]
    vl_local = in_process("qwen3-vl", None)

    async def run() -> tuple[list[Any], dict[str, Any]]:
        async with AsyncRenderClient(server.target, timeout=120) as async_client:
            remote = async_client.renderer("qwen3", chat_template_kwargs={"enable_thinking": False})
            assert isinstance(remote, AsyncRemoteRenderer)
            results = await asyncio.gather(*(getattr(remote, method)(*a, **k) for method, a, k in calls))
            vl = async_client.renderer("qwen3-vl")
            info = await vl.describe()
            rendered = await vl.render(image, add_generation_prompt=True)
            placeholder_only = await vl.render(image, add_generation_prompt=True, process_multimodal=False)
            return results, {
                "stop": await remote.get_stop_token_ids(),
                "info": info,
                "rendered": rendered,
                "placeholder_only": placeholder_only,
                "sample": await aio.build_training_sample(vl, image),
            }

    results, other = asyncio.run(run())
    for (method, _, _), want, got in zip(calls, expected, results, strict=True):
        assert got == want, method
    assert other["stop"] == local.get_stop_token_ids()
    assert other["info"].renderer_class == "renderers.qwen3_vl.Qwen3VLRenderer"
    assert other["info"].attributes["supports_process_multimodal"] is True
    want = vl_local.render(image, add_generation_prompt=True)
    assert other["rendered"].token_ids == want.token_ids
    assert other["placeholder_only"] == vl_local.render(image, add_generation_prompt=True, process_multimodal=False)
    assert not sample_differences(renderers.build_training_sample(vl_local, image), other["sample"])


def test_process_multimodal_false_sends_no_image_and_renders_placeholders(client: RenderClient) -> None:
    # As verifiers' TrainClient renders image prompts: the engine expands the placeholders itself,
    # from image URLs the server never sees (here one it could not fetch).
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}]},
    ]  # fmt: skip
    local, remote = in_process("qwen3-vl", None), client.renderer("qwen3-vl")
    expected = local.render(messages, add_generation_prompt=True, process_multimodal=False)
    assert remote.render(messages, add_generation_prompt=True, process_multimodal=False) == expected
    image_pad = next(token for token, kind in local.mm_token_type_id_map.items() if kind == 1)
    assert expected.multi_modal_data is None and expected.token_ids.count(image_pad) == 1  # one placeholder
    prompt = expected.token_ids
    completion = [*qwen3_tokenizer().encode("A cat.", add_special_tokens=False), local.get_stop_token_ids()[0]]
    follow_up = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.invalid/dog.png"}}]}
    ]
    bridged = local.bridge_to_next_turn(prompt, completion, follow_up, process_multimodal=False)
    assert bridged is not None
    assert remote.bridge_to_next_turn(prompt, completion, follow_up, process_multimodal=False) == bridged
    # With images processed, a URL is refused before anything is sent.
    with pytest.raises(RenderError, match="URLs and file paths are not sent"):
        remote.render(messages, add_generation_prompt=True)
    # A text renderer has no such argument, remotely as in process.
    with pytest.raises(TypeError):
        client.renderer("qwen3").render([{"role": "user", "content": "x"}], process_multimodal=False)
