"""ListModels and RendererInfo, both directions: what a server has loaded."""

from __future__ import annotations

import json

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
    )


def decode_renderer_info(message: pb.RendererInfo) -> RendererInfo:
    return RendererInfo(
        stop_token_ids=tuple(message.stop_token_ids),
        is_prefix_stable=message.is_prefix_stable,
        multimodal=message.multimodal,
        mm_token_type_id_map={entry.token_id: entry.type_id for entry in message.mm_token_type_id_map},
    )
