"""The one-line switch: renderers' own create_renderer / load_tokenizer return remote renderers.

    import render_client
    render_client.serve_renderers("render-service:50051")    # at start-up, before or after imports

From then on, in this process, `renderers.create_renderer(tokenizer, config,
chat_template_kwargs=...)` and `renderers.base.load_tokenizer(name)`, however the
caller imported them (module attribute, or `from renderers.base import
create_renderer` bound earlier: every loaded module's binding is switched), serve
from the server what it serves:

- `load_tokenizer(name)` loads nothing when the server serves hub model `name`
  (at the revision renderers would load): it returns a ServedTokenizer, which loads
  the real tokenizer only if something other than create_renderer uses it.
- `create_renderer(tokenizer, config, chat_template_kwargs=...)` resolves the config
  as renderers does, then returns the server's renderer (a RemoteRenderer, the twin
  of the in-process one: renderer.py) when a server model declares that hub model
  (ListModels' hub_model: `tokenizer.name_or_path`), renders that config (the same
  config class and values, with these kwargs applied), and, when the caller has the
  tokenizer itself, has the same tokenizer (fingerprint).

Anything else is built in process, as before, with one log line (logger
`render_client.switch`, INFO) saying why; so is everything when the server renders
with another renderers version than this process has. `undo()` (or
`stop_serving_renderers()`) puts renderers' functions back.

For a program whose code is not yours, the switch can be made by its launch command:

    python -m render_client.switch render-service:50051 prime_rl.trainer.sft.train @ sft.toml

runs the module as `python -m prime_rl.trainer.sft.train @ sft.toml` would, switched.
"""

from __future__ import annotations

import logging
import runpy
import sys
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from render_wire.types import ModelInfo, ServerModels

from .client import RenderClient
from .fingerprint import tokenizer_fingerprint
from .renderer import RemoteRenderer, config_from_info

log = logging.getLogger(__name__)

# Config fields that change nothing a renderer returns, only how it caches: a server's
# bound (the server bounds its image caches in bytes anyway) need not be the trainer's.
OUTPUT_NEUTRAL_FIELDS = frozenset({"image_cache_max"})


def serve_renderers(
    target: str | Sequence[str] | RenderClient,
    *,
    timeout: float | None = 120,
    connections: int = 1,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> RendererSwitch:
    """Switch this process's renderers.create_renderer / load_tokenizer to the server at
    `target` (a RenderClient, or what RenderClient takes) for what it serves; see the module
    docstring. Asks the server what it serves now (raises if it cannot be reached).
    Replaces a switch made before. Returns the switch: `.undo()` reverses it."""
    if isinstance(target, RenderClient):
        client = target
    else:
        client = RenderClient(target, timeout=timeout, connections=connections, token=token, credentials=credentials)
    switch = RendererSwitch(client)
    global _active
    with _switching:
        if _active is not None:
            _active.undo()
        switch._install()
        _active = switch
    return switch


def stop_serving_renderers() -> None:
    """Undo the switch serve_renderers made, if any."""
    with _switching:
        if _active is not None:
            _active.undo()


_switching = threading.RLock()
_active: RendererSwitch | None = None


class RendererSwitch:
    """renderers' create_renderer and load_tokenizer, switched to a render-server (serve_renderers)."""

    def __init__(self, client: RenderClient) -> None:
        import renderers
        import renderers.base

        self.client = client
        self.models: ServerModels = client.list_models()
        self.renderers_version: str = renderers.__version__
        self._create_renderer: Callable[..., Any] = renderers.base.create_renderer
        self._load_tokenizer: Callable[..., Any] = renderers.base.load_tokenizer
        self._switched: list[tuple[types.ModuleType, str, object]] = []
        self._said: set[str] = set()
        self._said_lock = threading.Lock()
        self._fingerprints: weakref.WeakKeyDictionary[Any, tuple[int, Any, str | None]] = weakref.WeakKeyDictionary()

    # -- what the caller gets ---------------------------------------------------------------

    def create_renderer(
        self, tokenizer: Any, config: Any = None, *, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        """renderers.create_renderer, served by the server where it serves this renderer."""
        remote = self.remote_renderer(tokenizer, config, chat_template_kwargs)
        if remote is not None:
            return remote
        if isinstance(tokenizer, ServedTokenizer):
            tokenizer = tokenizer.local()
        return self._create_renderer(tokenizer, config, chat_template_kwargs=chat_template_kwargs)

    def load_tokenizer(self, model_name_or_path: str) -> Any:
        """renderers.base.load_tokenizer: nothing loaded for a hub model the server serves."""
        served, why = self._serves_hub_model(model_name_or_path)
        if served:
            self._say(f"load_tokenizer({model_name_or_path!r}): not loaded here; {why}")
            return ServedTokenizer(model_name_or_path, self._load_tokenizer)
        self._say(f"load_tokenizer({model_name_or_path!r}): loaded in process: {why}")
        return self._load_tokenizer(model_name_or_path)

    def remote_renderer(
        self, tokenizer: Any, config: Any = None, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> RemoteRenderer | None:
        """The server's renderer standing in for create_renderer(tokenizer, config, chat_template_kwargs=...),
        or None (logged once, with why) when the server does not serve it."""
        import renderers
        import renderers.base

        name = getattr(tokenizer, "name_or_path", None)
        call = f"create_renderer({name!r}, {_describe(config)}{_kwargs_text(chat_template_kwargs)})"
        if self.models.renderers_version != self.renderers_version:
            return self._in_process(call, self._version_mismatch())
        candidates = [model for model in self.models.models if model.hub_model and model.hub_model == name]
        if not candidates:
            return self._in_process(call, f"the server serves no model of hub model {name!r} ({self._served()})")
        if not isinstance(tokenizer, ServedTokenizer):
            fingerprint = self._fingerprint(tokenizer)
            if fingerprint is None:
                return self._in_process(call, "its tokenizer is not a fast Hugging Face tokenizer to compare")
            candidates = [model for model in candidates if model.tokenizer_fingerprint == fingerprint]
            if not candidates:
                return self._in_process(call, f"this process's tokenizer for {name!r} differs from the server's")
        try:
            wanted = renderers.base._resolve_renderer_config(
                tokenizer, config, chat_template_kwargs=chat_template_kwargs
            )
        except Exception as exc:  # renderers raises it again, in process
            return self._in_process(call, f"renderers refuses it ({type(exc).__name__}: {exc})")
        if isinstance(wanted, renderers.CustomRendererConfig):
            return self._in_process(call, "custom renderers are not served")
        for model, kwargs in sorted(self._matches(candidates, wanted), key=lambda match: bool(match[1])):
            remote = self.client.renderer(model.id, chat_template_kwargs=kwargs or None)
            if not same_config(remote.config, wanted):  # the server applied the kwargs otherwise
                continue
            remote.__dict__["config"] = wanted  # create_renderer's renderer has the config it was given
            self._say(f"{call}: served by render-server model {model.id!r}" + _kwargs_text(kwargs))
            return remote
        configs = ", ".join(f"{model.id}: {_describe(config_of(model))}" for model in candidates)
        return self._in_process(call, f"the server's models of {name!r} render other configs ({configs})")

    # -- installing it ------------------------------------------------------------------------

    def _install(self) -> None:
        import renderers.base

        originals = {id(self._create_renderer): self.create_renderer, id(self._load_tokenizer): self.load_tokenizer}
        # Every binding of the originals in a loaded module: `from renderers.base import
        # create_renderer` at a module's import binds the function itself.
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(module, types.ModuleType) or not isinstance(namespace, dict):
                continue
            for name, value in list(namespace.items()):
                replacement = originals.get(id(value))
                if replacement is not None:
                    setattr(module, name, replacement)
                    self._switched.append((module, name, value))
        assert renderers.base.create_renderer == self.create_renderer  # found above, in renderers.base itself
        log.info("renderers' create_renderer and load_tokenizer switched to a render-server: %s", self._served())

    def undo(self) -> None:
        """Put renderers' create_renderer and load_tokenizer back where this switch replaced them."""
        global _active
        with _switching:
            for module, name, original in reversed(self._switched):
                if getattr(module, name, None) in (self.create_renderer, self.load_tokenizer):
                    setattr(module, name, original)
            self._switched.clear()
            if _active is self:
                _active = None

    def __enter__(self) -> RendererSwitch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    # -- matching -------------------------------------------------------------------------------

    def _serves_hub_model(self, name: str) -> tuple[bool, str]:
        if self.models.renderers_version != self.renderers_version:
            return False, self._version_mismatch()
        revision = _revision_loaded(name)
        models = [
            model.id for model in self.models.models if model.hub_model == name and model.hub_revision == revision
        ]
        if models:
            return True, f"the server serves it (models {', '.join(models)})"
        return False, f"the server serves no model of hub model {name!r} at that revision ({self._served()})"

    def _matches(self, candidates: list[ModelInfo], wanted: Any) -> list[tuple[ModelInfo, dict[str, Any]]]:
        """The candidates rendering `wanted`, with the chat-template kwargs that make them do so."""
        found = []
        for model in candidates:
            base = config_of(model)
            kwargs = None if base is None else kwargs_between(base, wanted)
            if kwargs is not None:
                found.append((model, kwargs))
        return found

    def _fingerprint(self, tokenizer: Any) -> str | None:
        """tokenizer_fingerprint, kept per tokenizer while its vocabulary and template stay."""
        try:
            state = (len(tokenizer), getattr(tokenizer, "chat_template", None))
            known = self._fingerprints.get(tokenizer)
        except TypeError:  # not weak-referenceable, or no len
            known, state = None, None
        if known is not None and known[:2] == state:
            return known[2]
        try:
            fingerprint: str | None = tokenizer_fingerprint(tokenizer)
        except (TypeError, AttributeError, ValueError):
            fingerprint = None
        if state is not None:
            self._fingerprints[tokenizer] = (*state, fingerprint)
        return fingerprint

    # -- saying why -------------------------------------------------------------------------------

    def _in_process(self, call: str, why: str) -> RemoteRenderer | None:
        """None (build it in process), saying why."""
        self._say(f"{call}: built in process: {why}")
        return None

    def _say(self, line: str) -> None:
        with self._said_lock:
            if line in self._said:
                return
            self._said.add(line)
        log.info("%s", line)

    def _version_mismatch(self) -> str:
        return (
            f"the server renders with renderers {self.models.renderers_version},"
            f" this process has {self.renderers_version}"
        )

    def _served(self) -> str:
        served = [f"{model.id} = {model.hub_model}" for model in self.models.models if model.hub_model]
        return "it serves " + (", ".join(served) if served else "no model with a declared hub_model")


class ServedTokenizer:
    """What the switched load_tokenizer(name) returns for a hub model the server serves: its
    name (`name_or_path`), for create_renderer, and nothing loaded. Anything else asked of it
    loads the real tokenizer (renderers' load_tokenizer) once and asks that."""

    def __init__(self, name_or_path: str, load: Callable[[str], Any]) -> None:
        self.name_or_path = name_or_path
        self._load = load
        self._tokenizer: Any = None
        self._loading = threading.Lock()

    def local(self) -> Any:
        """The real tokenizer, loaded on first use."""
        if self._tokenizer is None:
            with self._loading:
                if self._tokenizer is None:
                    log.info("load_tokenizer(%r): loading it here after all, for a use other than create_renderer",
                             self.name_or_path)  # fmt: skip
                    self._tokenizer = self._load(self.name_or_path)
        return self._tokenizer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_load", "_tokenizer", "_loading"):
            raise AttributeError(name)
        return getattr(self.local(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local()(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.local())

    def __reduce__(self) -> tuple[object, ...]:
        # Loaded again (or served again, where switched) in the process that unpickles it.
        return (_load_tokenizer, (self.name_or_path,))

    def __repr__(self) -> str:
        return f"<ServedTokenizer {self.name_or_path!r}: served by a render-server, not loaded here>"


def _load_tokenizer(name: str) -> Any:
    import renderers.base

    return renderers.base.load_tokenizer(name)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def config_of(model: ModelInfo) -> Any:
    """renderers' config object for the config a server model renders, or None."""
    if model.renderer_info is None or not model.renderer_info.config:
        return None
    config = config_from_info(model.renderer_info)
    return None if isinstance(config, dict) else config


def kwargs_between(base: Any, wanted: Any) -> dict[str, Any] | None:
    """The chat-template kwargs that turn config `base` into `wanted` as create_renderer applies
    them (renderers.merge_chat_template_kwargs), or None when none do: the same config class and
    values, and the same fields set, but for OUTPUT_NEUTRAL_FIELDS."""
    import renderers

    if type(base) is not type(wanted):
        return None
    template_fields = renderers.template_field_names(wanted)
    kwargs = {name: getattr(wanted, name) for name in wanted.model_fields_set if name in template_fields}
    if type(wanted)._allow_opaque_template_kwargs:
        kwargs.update(wanted.model_extra or {})
    try:
        merged = renderers.merge_chat_template_kwargs(base, kwargs)
    except ValueError:
        return None
    return kwargs if same_config(merged, wanted) else None


def same_config(one: Any, other: Any) -> bool:
    """Whether two renderers configs render alike: the same values and fields set, but for
    OUTPUT_NEUTRAL_FIELDS and `name` (merge_chat_template_kwargs always sets it)."""
    if type(one) is not type(other):
        return False
    neutral = set(OUTPUT_NEUTRAL_FIELDS)
    values = one.model_dump(mode="json", exclude=neutral) == other.model_dump(mode="json", exclude=neutral)
    ignored = neutral | {"name"}
    return bool(values and one.model_fields_set - ignored == other.model_fields_set - ignored)


def _revision_loaded(name: str) -> str | None:
    """The revision renderers' load_tokenizer loads for `name` (None: the default branch)."""
    import renderers.base

    try:
        source = renderers.base._tokenizer_source_for(name)
        revision = renderers.base._tokenizer_load_kwargs(source).get("revision")
    except Exception:  # a renderers version without these helpers: the default branch
        return None
    return revision if isinstance(revision, str) else None


def _describe(config: Any) -> str:
    if config is None:
        return "auto"
    dump = getattr(config, "model_dump", None)
    return repr(dump(mode="json", exclude_unset=True) | {"name": config.name}) if dump else repr(config)


def _kwargs_text(kwargs: Mapping[str, Any] | None) -> str:
    return f", chat_template_kwargs={dict(kwargs)!r}" if kwargs else ""


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m render_client.switch TARGET MODULE [ARGS...]`: MODULE run as __main__, switched."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0].startswith("-"):
        raise SystemExit("usage: python -m render_client.switch TARGET MODULE [ARGS...]")
    target, module, rest = args[0], args[1], args[2:]
    # Its lines said on stderr, whatever logging the program sets up (or not) later.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    serve_renderers(target)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    # The package's module, not this __main__ copy of it: one switch, the one stop_serving_renderers undoes.
    from render_client import switch

    switch.main()
