"""An SFT trainer's data side, in the shape of prime-rl's (trainer/sft/train.py and data.py).

Written for tests/test_prime_rl_sft.py, which runs it unchanged with and without
`render_client.serve_renderers`. Like prime-rl it binds renderers' functions at
import (`from renderers.base import create_renderer, build_training_sample`),
loads its tokenizer itself (AutoTokenizer, pad = eos), builds the renderer with
create_renderer, hands a VLM renderer its processor when it has a `_processor`,
and builds each sample with its loss-mask settings: role_to_mask only when
assistant turns are not trained, other roles through content_sft_roles,
ensure_final_stop, then the causal shift and prime-rl's checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from renderers.base import build_training_sample, create_renderer
from transformers import AutoTokenizer


@dataclass(frozen=True)
class LossMask:
    """prime-rl's LossMaskConfig: which roles' tokens are trained on."""

    system: bool = False
    user: bool = False
    assistant: bool = True
    tool: bool = False


def setup_tokenizer(folder: str, name: str) -> Any:
    """The trainer's tokenizer for hub model `name` (here from `folder`: the hub's files)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.name_or_path = name
    tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def setup_renderer(tokenizer: Any, config: Any, processor: Any = None) -> Any:
    renderer = create_renderer(tokenizer, config)
    if processor is not None and hasattr(renderer, "_processor"):
        renderer._processor = processor
    return renderer


@dataclass
class SFTDataset:
    """Examples and the renderer; `process` makes one example a training sample."""

    renderer: Any
    examples: list[dict[str, Any]]
    loss_mask: LossMask = LossMask()

    def process(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        mask = self.loss_mask

        def should_mask(message: dict[str, Any]) -> bool:
            return bool(getattr(mask, message["role"]))

        sample = build_training_sample(
            self.renderer,
            example["messages"],
            role_to_mask=None if mask.assistant else should_mask,
            tools=example.get("tools") or [],
            content_sft_roles={role for role in ("user", "system", "tool") if getattr(mask, role)} or None,
            ensure_final_stop=True,
        )
        ids, loss_mask = list(sample.token_ids), list(sample.loss_mask)
        types = list(sample.mm_token_type_ids) if sample.mm_token_type_ids is not None else None
        stops = set(self.renderer.get_stop_token_ids())
        assert stops & set(ids[1:]), "a renderer stop token must be among the targets"
        media = sample.multi_modal_data
        return {
            "id": example["id"],
            "input_ids": ids[:-1],
            "target_ids": ids[1:],
            "loss_mask": loss_mask[1:],
            "position_ids": list(range(len(ids) - 1)),
            "mm_token_type_ids": None if types is None else types[:-1],
            "mm_items": None if media is None else media.mm_items,
            "trained_tokens": sum(loss_mask[1:]),
        }
