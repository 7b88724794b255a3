"""ListModels and RendererInfo both ways: what a server declares reaches the client unchanged."""

from __future__ import annotations

from render_wire.models import decode_models, decode_renderer_info, encode_models, encode_renderer_info
from render_wire.pb import render_pb2 as pb
from render_wire.types import ModelInfo, RendererInfo, ServerModels

INFO = RendererInfo(
    stop_token_ids=(151645, 151643),
    is_prefix_stable=True,
    multimodal=True,
    mm_token_type_id_map={151655: 1, 151656: 2},
    renderer_class="renderers.qwen3_vl.Qwen3VLRenderer",
    config={"name": "qwen3-vl", "thinking_retention": None, "image_cache_max": 32, "add_vision_id": False},
    config_fields_set=("image_cache_max",),
    attributes={"effective_thinking_retention": "all", "supports_process_multimodal": True},
    unserved_attributes=("tokenizer",),
)


def test_renderer_info_round_trips_with_class_config_and_attributes() -> None:
    wire = pb.RendererInfo.FromString(encode_renderer_info(INFO).SerializeToString())
    assert decode_renderer_info(wire) == INFO
    # Key order and JSON types are kept (an int stays an int, None stays null).
    assert list(decode_renderer_info(wire).config) == list(INFO.config)


def test_an_older_server_s_info_decodes_with_nothing_declared() -> None:
    old = pb.RendererInfo(stop_token_ids=[1], is_prefix_stable=False)
    info = decode_renderer_info(old)
    assert (info.renderer_class, info.config, info.attributes, info.unserved_attributes) == ("", {}, {}, ())


def test_list_models_carries_the_hub_model_each_model_is() -> None:
    models = ServerModels(
        models=(
            ModelInfo("qwen3-vl", "qwen3-vl", True, "sha256:x", ("user",), {"name": "qwen3-vl"}, INFO, "Qwen/Qwen3-VL-8B-Instruct", "abc"),
            ModelInfo("local", "qwen3", False, "sha256:y", ("user",), {"name": "qwen3"}, None),
        ),
        renderers_version="0.1.12",
        transformers_version="5.24.0",
    )  # fmt: skip
    decoded = decode_models(pb.ListModelsResponse.FromString(encode_models(models).SerializeToString()))
    assert decoded == models
    assert (decoded.models[1].hub_model, decoded.models[1].hub_revision) == ("", None)
