"""The model registry file: which models a server loads, and from where.

A TOML file with one table per model id:

    [models.qwen3]
    renderer = "qwen3"                                  # a renderers config name
    tokenizer = { hub = "Qwen/Qwen3-8B" }               # or { path = "..." } or { package = "..." }
    roles = ["system", "user", "assistant", "tool"]     # optional; this is the default
    [models.qwen3.renderer_options]                     # optional renderer config fields
    enable_thinking = true

VLMs add `image_processor = { path | hub | package = ..., options = {...} }`.
Relative paths are relative to the file.

`hub_model = "Qwen/Qwen3-8B"` (and `hub_revision`) declares which Hugging Face
model's files a path or package source holds; a hub source declares its own.
ListModels reports it, and render_client.serve_renderers takes a trainer's
`create_renderer(load_tokenizer("Qwen/Qwen3-8B"), ...)` for this model only
when it names that model (and its config matches): declare it only for files
that are that model's. `default_models.toml` beside this
module is the registry the server loads when given none.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_models.toml")
DEFAULT_ROLES = ("system", "user", "assistant", "tool")


class ConfigError(ValueError):
    """The registry file is malformed; the message names the key."""


@dataclass(frozen=True)
class Source:
    """Where a tokenizer's or processor's files come from: exactly one of the three."""

    path: Path | None = None  # a local directory
    hub: str | None = None  # a Hugging Face model id, fetched at start-up (or from its cache)
    revision: str | None = None  # with `hub`: a branch, tag or commit
    package: str | None = None  # an installed Python package that ships the files...
    subdir: str | None = None  # ...in this folder of it

    def describe(self) -> str:
        if self.path is not None:
            return f"path {self.path}"
        if self.hub is not None:
            return f"hub {self.hub}" + (f"@{self.revision}" if self.revision else "")
        return f"package {self.package}" + (f"/{self.subdir}" if self.subdir else "")


@dataclass(frozen=True)
class ModelConfig:
    """One model of the registry."""

    id: str
    renderer: str
    tokenizer: Source
    renderer_options: dict[str, Any] = field(default_factory=dict)
    image_processor: Source | None = None
    image_processor_options: dict[str, Any] = field(default_factory=dict)
    roles: tuple[str, ...] = DEFAULT_ROLES
    hub_model: str | None = None  # the Hugging Face model whose files these are
    hub_revision: str | None = None  # ...at this revision (None: its default branch)


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> list[ModelConfig]:
    """The models a registry file names, in file order."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{path}: no [models.<id>] tables")
    unknown = set(document) - {"models"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
    return [_model(model_id, table, path.parent) for model_id, table in models.items()]


_MODEL_KEYS = {"renderer", "tokenizer", "renderer_options", "image_processor", "roles", "hub_model", "hub_revision"}
_SOURCE_KEYS = {"path", "hub", "revision", "package", "subdir", "options"}


def _model(model_id: str, table: Any, base: Path) -> ModelConfig:
    where = f"models.{model_id}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    renderer = table.get("renderer")
    if not isinstance(renderer, str) or not renderer:
        raise ConfigError(f"{where}.renderer: required, a renderers config name such as 'qwen3'")
    if renderer == "auto":
        raise ConfigError(f"{where}.renderer: name the renderer explicitly; 'auto' guesses from the model name")
    roles = table.get("roles", list(DEFAULT_ROLES))
    if not isinstance(roles, list) or not roles or not all(isinstance(role, str) and role for role in roles):
        raise ConfigError(f"{where}.roles: must be a non-empty list of role names")
    renderer_options = table.get("renderer_options", {})
    if not isinstance(renderer_options, dict):
        raise ConfigError(f"{where}.renderer_options: must be a table")
    tokenizer, _ = _source(table.get("tokenizer"), f"{where}.tokenizer", base)
    image_processor = processor_options = None
    if "image_processor" in table:
        image_processor, processor_options = _source(table["image_processor"], f"{where}.image_processor", base)
    hub_model, hub_revision = _hub_model(table, where, tokenizer, image_processor)
    return ModelConfig(
        id=model_id,
        renderer=renderer,
        tokenizer=tokenizer,
        renderer_options=renderer_options,
        image_processor=image_processor,
        image_processor_options=processor_options or {},
        roles=tuple(roles),
        hub_model=hub_model,
        hub_revision=hub_revision,
    )


def _hub_model(
    table: dict[str, Any], where: str, tokenizer: Source, image_processor: Source | None
) -> tuple[str | None, str | None]:
    """The hub model (and revision) the model's files are: declared, or its hub sources' own."""
    for key in ("hub_model", "hub_revision"):
        if key in table and (not isinstance(table[key], str) or not table[key]):
            raise ConfigError(f"{where}.{key}: must be a non-empty string")
    if "hub_revision" in table and "hub_model" not in table:
        raise ConfigError(f"{where}.hub_revision: only goes with hub_model")
    hub_sources = {
        name: (source.hub, source.revision)
        for name, source in (("tokenizer", tokenizer), ("image_processor", image_processor))
        if source is not None and source.hub is not None
    }
    if "hub_model" not in table:
        # The hub sources' own, when they agree; files from two hub models are neither's.
        distinct = set(hub_sources.values())
        return distinct.pop() if len(distinct) == 1 else (None, None)
    declared = (table["hub_model"], table.get("hub_revision"))
    for name, own in hub_sources.items():
        if own != declared:
            revision = f"@{own[1]}" if own[1] else ""
            raise ConfigError(
                f"{where}.hub_model: the {name} comes from hub {own[0]}{revision}; "
                "hub_model and hub_revision must name the same, or be left out"
            )
    return declared


def _source(table: Any, where: str, base: Path) -> tuple[Source, dict[str, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: required, a table with one of path, hub or package")
    unknown = set(table) - _SOURCE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    kinds = [key for key in ("path", "hub", "package") if key in table]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: set exactly one of path, hub or package")
    for key in ("path", "hub", "revision", "package", "subdir"):
        if key in table and (not isinstance(table[key], str) or not table[key]):
            raise ConfigError(f"{where}.{key}: must be a non-empty string")
    if "revision" in table and "hub" not in table:
        raise ConfigError(f"{where}.revision: only goes with hub")
    if "subdir" in table and "package" not in table:
        raise ConfigError(f"{where}.subdir: only goes with package")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options: must be a table")
    path = base / table["path"] if "path" in table else None
    return (
        Source(
            path=path,
            hub=table.get("hub"),
            revision=table.get("revision"),
            package=table.get("package"),
            subdir=table.get("subdir"),
        ),
        options,
    )


# A Hugging Face commit id: the only revision that names the same files forever.
_COMMIT = re.compile(r"[0-9a-f]{40}")


def unpinned_sources(models: Iterable[ModelConfig]) -> list[str]:
    """Each hub source whose revision is not a commit id (a branch or tag moves; none means "main").

    Replicas started at different times would load different files under one
    model id; render-server refuses them unless --allow-unpinned-revisions.
    """
    found = []
    for model in models:
        for kind, source in (("tokenizer", model.tokenizer), ("image_processor", model.image_processor)):
            if source is not None and source.hub is not None and not _COMMIT.fullmatch(source.revision or ""):
                revision = f"revision {source.revision!r}" if source.revision else "no revision (the hub's 'main')"
                found.append(f"models.{model.id}.{kind}: {source.hub} with {revision}, not a 40-hex commit id")
    return found
