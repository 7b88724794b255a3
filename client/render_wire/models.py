"""ListModels and RendererInfo, both directions: what a server has loaded."""

from __future__ import annotations

import json

from .errors import invalid
from .jsonvalue import dump_json, load_json
from .pb import render_pb2 as pb
from .types import (
    ModelInfo,
    RendererInfo,
    ServerModels,
)

# ---------------------------------------------------------------------------
# ListModels
# ---------------------------------------------------------------------------


def encode_models(models: ServerModels) -> pb.ListModelsResponse:
    """The ListModels answer for a server's models."""
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                id=model.id,
                renderer=model.renderer,
                accepts_images=model.accepts_images,
                tokenizer_fingerprint=model.tokenizer_fingerprint,
                roles=model.roles,
                renderer_config_json=json.dumps(model.renderer_config, ensure_ascii=False),
                renderer_info=None if model.renderer_info is None else encode_renderer_info(model.renderer_info),
                hub_model=model.hub_model,
                hub_revision=model.hub_revision,
            )
            for model in models.models
        ],
        renderers_version=models.renderers_version,
        transformers_version=models.transformers_version,
        held_images=models.held_images,
    )


def decode_models(message: pb.ListModelsResponse) -> ServerModels:
    """The ServerModels a ListModels answer carries."""
    return ServerModels(
        models=tuple(
            ModelInfo(
                id=model.id,
                renderer=model.renderer,
                accepts_images=model.accepts_images,
                tokenizer_fingerprint=model.tokenizer_fingerprint,
                roles=tuple(model.roles),
                renderer_config=json.loads(model.renderer_config_json or "{}"),
                renderer_info=decode_renderer_info(model.renderer_info) if model.HasField("renderer_info") else None,
                hub_model=model.hub_model,
                hub_revision=model.hub_revision if model.HasField("hub_revision") else None,
            )
            for model in message.models
        ),
        renderers_version=message.renderers_version,
        transformers_version=message.transformers_version,
        held_images=message.held_images,
    )


def encode_renderer_info(info: RendererInfo) -> pb.RendererInfo:
    return pb.RendererInfo(
        stop_token_ids=info.stop_token_ids,
        is_prefix_stable=info.is_prefix_stable,
        multimodal=info.multimodal,
        mm_token_type_id_map=[
            pb.TokenTypeEntry(token_id=token_id, type_id=type_id)
            for token_id, type_id in info.mm_token_type_id_map.items()
        ],
        renderer_class=info.renderer_class,
        config_json=dump_json(info.config, "config"),
        config_fields_set=info.config_fields_set,
        attributes_json=dump_json(info.attributes, "attributes"),
        unserved_attributes=info.unserved_attributes,
    )


def decode_renderer_info(message: pb.RendererInfo) -> RendererInfo:
    config = load_json(message.config_json or "{}", "config_json")
    attributes = load_json(message.attributes_json or "{}", "attributes_json")
    if type(config) is not dict or type(attributes) is not dict:
        raise invalid("renderer_info", "config_json and attributes_json must be JSON objects")
    return RendererInfo(
        stop_token_ids=tuple(message.stop_token_ids),
        is_prefix_stable=message.is_prefix_stable,
        multimodal=message.multimodal,
        mm_token_type_id_map={entry.token_id: entry.type_id for entry in message.mm_token_type_id_map},
        renderer_class=message.renderer_class,
        config=config,
        config_fields_set=tuple(message.config_fields_set),
        attributes=attributes,
        unserved_attributes=tuple(message.unserved_attributes),
    )
