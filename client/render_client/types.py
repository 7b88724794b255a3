"""The results a client hands back: mirrors of the renderers dataclasses.

They hold the same values, in the same Python types, as the dataclasses
`renderers.build_training_sample` returns in-process, so trainer code reads them
the same way. Tensors are numpy arrays decoded straight from the response bytes
without a copy, so they are read-only: call `.copy()` to write to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PlaceholderRange:
    """Where one media item's placeholder tokens sit in `token_ids`."""

    offset: int
    length: int


@dataclass
class MultiModalData:
    """The media a VLM renderer emitted, keyed by modality ("image", "video")."""

    mm_hashes: dict[str, list[str]] = field(default_factory=dict)
    mm_placeholders: dict[str, list[PlaceholderRange]] = field(default_factory=dict)
    mm_items: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.mm_hashes or self.mm_placeholders or self.mm_items)


@dataclass(frozen=True)
class RenderedTrainingSample:
    """One training sample: `renderers.RenderedTrainingSample` field for field.

    `multi_modal_data` and `mm_token_type_ids` are None for text-only renderers
    and text-only samples; `mm_token_type_ids` has one entry per token
    (0 text, 1 image, 2 video) when media was rendered.
    """

    token_ids: list[int]
    loss_mask: list[bool]
    multi_modal_data: MultiModalData | None = None
    mm_token_type_ids: list[int] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One model a server has loaded (from ListModels)."""

    id: str
    renderer: str
    accepts_images: bool
    tokenizer_fingerprint: str
    roles: tuple[str, ...]
    renderer_config: dict[str, Any]


@dataclass(frozen=True)
class ServerModels:
    """What ListModels answers: the models and the library versions behind them."""

    models: tuple[ModelInfo, ...]
    renderers_version: str
    transformers_version: str

    def get(self, model_id: str) -> ModelInfo:
        for model in self.models:
            if model.id == model_id:
                return model
        raise KeyError(model_id)
