"""What the benchmarks render: the corpus conversations each model renders in-process."""

from __future__ import annotations

from typing import Any

import renderers

from tests.reference import reference_renderer
from tests.support import corpus


def assistant_only(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant"


def working_set(model: str) -> list[dict[str, Any]]:
    """The corpus conversations the model renders in-process (some templates refuse some)."""
    renderer = reference_renderer(model)
    kept = []
    for conversation in corpus():
        try:
            renderers.build_training_sample(
                renderer, conversation["messages"], tools=conversation.get("tools"), role_to_mask=assistant_only
            )
        except Exception:
            continue
        kept.append({"messages": conversation["messages"], "tools": conversation.get("tools")})
    return kept
