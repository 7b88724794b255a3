"""Processed images kept within a byte budget per process: the cache itself, the registry's renderers, a live server."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import renderers
from google.protobuf import json_format
from PIL import Image
from transformers import BatchFeature

from render_client import RenderClient, SampleRequest
from render_server.config import ConfigError, load_config
from render_server.image_cache import DEFAULT_IMAGE_CACHE_MB, ImageCacheBudget, MiB, install, processed_bytes
from render_server.registry import ModelRegistry
from render_wire.requests import encode_sample_request
from tests.support import running_server


def entry(mib: float) -> tuple[BatchFeature, int]:
    """A cache entry as renderers stores one: (the image processor's output, its token count)."""
    pixels = np.zeros(int(mib * MiB) // 4, dtype=np.float32)
    return BatchFeature({"pixel_values": pixels, "image_grid_thw": np.array([[1, 2, 2]])}), 7


def charged(*mibs: float) -> int:
    """The budget entries of these sizes take."""
    return sum(processed_bytes(entry(mib)) for mib in mibs)


def test_an_entry_costs_the_bytes_of_its_arrays() -> None:
    features, count = entry(3)
    assert processed_bytes((features, count)) == 3 * MiB + 3 * 8
    base = np.zeros(1000, dtype=np.uint8)
    # A view keeps its whole base alive, and two views of one base count it once.
    assert processed_bytes(({"a": base[:10], "b": base[500:]}, 1)) == 1000
    assert processed_bytes(({"grid": [1, 2], "name": "x"}, 3)) == 0


def test_the_oldest_entries_go_first_when_an_insert_would_pass_the_budget() -> None:
    budget = ImageCacheBudget(10 * MiB)
    cache = budget.new_cache()
    for key, mib in (("a", 4), ("b", 3), ("c", 2)):
        cache[key] = entry(mib)
    assert list(cache) == ["a", "b", "c"] and budget.used == charged(4, 3, 2)
    cache["d"] = entry(4)  # 13 MiB: "a" goes, 9 MiB stay
    assert list(cache) == ["b", "c", "d"]
    cache["e"] = entry(5)  # "b" and "c" go
    assert list(cache) == ["d", "e"]
    assert budget.used == charged(4, 5) <= budget.max_bytes
    hit = cache.get("d")
    assert hit is not None and hit[1] == 7 and cache.get("a") is None


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    budget = ImageCacheBudget(4 * MiB)
    cache = budget.new_cache()
    cache["small"] = entry(1)
    cache["huge"] = entry(5)
    assert list(cache) == ["small"] and budget.used == charged(1)
    nothing = ImageCacheBudget(0).new_cache()  # --image-cache-mb 0
    nothing["tiny"] = entry(0.001)
    assert len(nothing) == 0


def test_every_cache_of_a_process_shares_its_one_budget() -> None:
    budget = ImageCacheBudget(10 * MiB)
    first, second = budget.new_cache(), budget.new_cache()
    first["x"] = entry(4)
    second["x"] = entry(4)  # the same key in another cache is another entry
    first["y"] = entry(1)
    assert budget.used == charged(4, 4, 1)
    second["z"] = entry(3)  # the process's oldest entry goes, whichever cache holds it
    assert list(first) == ["y"] and list(second) == ["x", "z"]
    assert budget.used <= budget.max_bytes


def test_what_the_renderers_call_keeps_the_account() -> None:
    budget = ImageCacheBudget(100 * MiB)
    cache = budget.new_cache()
    for key in "abcd":
        cache[key] = entry(1)
    # renderers' own eviction by count (image_cache_max), oldest first:
    cache.pop(next(iter(cache)))
    assert list(cache) == ["b", "c", "d"] and budget.used == charged(1, 1, 1)
    cache["c"] = entry(2)  # replaced: charged anew, now the newest
    assert list(cache) == ["b", "d", "c"] and budget.used == charged(1, 1, 2)
    del cache["b"]
    assert cache.pop("gone", None) is None
    with pytest.raises(KeyError):
        cache.pop("gone")
    assert cache.popitem()[0] == "c"
    cache.clear()
    assert len(cache) == 0 and budget.used == 0
    with pytest.raises(TypeError, match="item assignment only"):
        cache.update({"e": entry(1)})
    with pytest.raises(TypeError, match="item assignment only"):
        cache.setdefault("e", entry(1))


class _Renderer:
    def __init__(self, **caches: Any) -> None:
        self.__dict__.update(caches)


def test_a_renderer_that_caches_elsewhere_is_refused_at_start_up() -> None:
    cache = ImageCacheBudget(MiB).new_cache()
    renderer = _Renderer(_image_cache={}, _audio_cache={})
    install(renderer, cache, "models.m")
    assert renderer._image_cache is cache
    install(uncached := _Renderer(), cache, "models.m")  # renders images without caching them (Nemotron 3.5)
    assert not hasattr(uncached, "_image_cache")
    # A renamed cache, or one that is not a plain dict, would be bounded by count only: refuse to start.
    for renderer in (_Renderer(_processed_cache={}), _Renderer(_image_cache=[]), _Renderer(_image_cache={"h": 1})):
        with pytest.raises(ConfigError, match=r"models\.m: renderer _Renderer keeps .* \(--image-cache-mb\)"):
            install(renderer, cache, "models.m")


_FREES = """
import numpy as np
from render_server.image_cache import return_large_frees_to_the_os

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

assert return_large_frees_to_the_os()
big = np.ones(24 << 20, dtype=np.uint8)
del big  # by default glibc would now raise its mmap threshold to 24 MiB
before = rss()
arrays = [np.ones(8 << 20, dtype=np.uint8) for _ in range(20)]
del arrays[:-1]  # the newest stays, as a cache keeps its newest entries
print(rss() - before)
"""


def test_freed_arrays_leave_the_process() -> None:
    # With glibc's default, the 8 MiB arrays come from the heap and the 152 MiB freed under the kept one stay in RSS.
    grown = int(subprocess.run([sys.executable, "-c", _FREES], capture_output=True, text=True, check=True).stdout)
    assert grown < 32 * MiB


# -- the registry's renderers -----------------------------------------------------------


def image(side: int, seed: int) -> Image.Image:
    """A flat square whose first row spells `seed` in red: distinct content, a few KB as PNG."""
    picture = Image.new("RGB", (side, side), (seed * 37 % 256, 90, 200))
    pixels = picture.load()
    for bit in range(24):
        pixels[bit, 0] = ((seed >> bit) & 1) * 255, 0, 0
    return picture


def png(side: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    image(side, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_values_bytes(side: int) -> int:
    """qwen3-vl's pixel_values for a side x side image (side a multiple of 32: not resized).

    3 channels x 2 temporal patches x float32 per pixel.
    """
    return side * side * 24


def messages(picture: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": picture}]},
        {"role": "assistant", "content": "A square."},
    ]


@pytest.fixture(scope="module")
def qwen3_vl() -> ModelRegistry:
    configs = [config for config in load_config() if config.id == "qwen3-vl"]
    # Room for two 256x256 images (1.5 MiB of pixel_values each), not three.
    return ModelRegistry.load(configs, image_cache_bytes=int(2.5 * pixel_values_bytes(256)))


def test_the_registry_s_vlm_renderers_keep_processed_images_within_the_budget(qwen3_vl: ModelRegistry) -> None:
    model = qwen3_vl.get("qwen3-vl")
    budget = qwen3_vl.image_cache_budget
    assert budget is not None and model.image_cache is not None
    assert model.renderer._image_cache is model.image_cache and model.image_cache.budget is budget
    model.image_cache.clear()

    first = renderers.build_training_sample(model.renderer, messages(image(256, 1)))
    again = renderers.build_training_sample(model.renderer, messages(image(256, 1)))
    [first_item] = first.multi_modal_data.mm_items["image"]
    [again_item] = again.multi_modal_data.mm_items["image"]
    # A hit: the renderer returns the processed image it kept, not a new one.
    assert again_item["pixel_values"] is first_item["pixel_values"]
    assert first_item["pixel_values"].nbytes == pixel_values_bytes(256)
    assert len(model.image_cache) == 1 and budget.used == processed_bytes(next(iter(model.image_cache.values())))

    # Variants for chat_template_kwargs share the model's cache, and so the budget.
    variant = model.renderer_for({"add_vision_id": True})
    assert variant is not model.renderer and variant._image_cache is model.image_cache
    renderers.build_training_sample(variant, messages(image(256, 2)))
    renderers.build_training_sample(model.renderer, messages(image(256, 3)))
    # Three distinct images, two fit: the first went, by bytes (image_cache_max is 32).
    assert len(model.image_cache) == 2 < model.renderer.config.image_cache_max
    assert budget.used <= budget.max_bytes
    renewed = renderers.build_training_sample(model.renderer, messages(image(256, 1)))
    assert renewed.multi_modal_data.mm_items["image"][0]["pixel_values"] is not first_item["pixel_values"]
    # Byte-exact all the same.
    assert renewed.token_ids == first.token_ids
    assert np.array_equal(renewed.multi_modal_data.mm_items["image"][0]["pixel_values"], first_item["pixel_values"])


def test_the_default_registry_bounds_every_vlm_model() -> None:
    registry = ModelRegistry.load([config for config in load_config() if config.id in ("qwen3", "qwen3-vl")])
    assert registry.image_cache_budget is not None
    assert registry.image_cache_budget.max_bytes == DEFAULT_IMAGE_CACHE_MB * MiB
    assert registry.get("qwen3").image_cache is None
    assert registry.get("qwen3-vl").renderer._image_cache is registry.get("qwen3-vl").image_cache


# -- a live server -------------------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (its peak) of a process, bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


# The README's "Sizing" terms, for requests of one image whose pixel_values are P bytes:
# a render process peaks below its start-up RSS + --image-cache-mb + 4.5 P (one render's
# working set); at rest it holds below start-up + --image-cache-mb + 2 P (the last answer
# and its sample stay until the next request) + allocator slack.
RENDER_WORKING_SET = 4.5
SLACK = 64 * MiB


def test_distinct_large_images_leave_a_worker_and_the_http_process_within_the_sizing_bound() -> None:
    side = 2048
    pixel_values = pixel_values_bytes(side)  # 96 MiB, from a ~17 KB PNG
    budget = DEFAULT_IMAGE_CACHE_MB * MiB  # default flags: the README's figures are for them
    with running_server("--workers", "1") as server:
        [worker] = server.workers()
        render_processes = server.render_processes()
        http, http_render_process = server.http_processes()
        started = {pid: memory(pid)["VmRSS"] for pid in (worker, http, http_render_process, *render_processes)}

        # 16 distinct images: without the byte bound a render process keeps each (32 by count).
        with RenderClient(server.target, timeout=300) as client:
            for seed in range(16):
                sample = client.render(SampleRequest("qwen3-vl", messages(png(side, 1000 + seed))))
                assert sample.multi_modal_data.mm_items["image"][0]["pixel_values"].nbytes == pixel_values
                del sample
        for pid in render_processes:
            now = memory(pid)
            assert now["VmHWM"] <= started[pid] + budget + RENDER_WORKING_SET * pixel_values, (pid, now, started)
            assert now["VmRSS"] <= started[pid] + budget + 2 * pixel_values + SLACK, (pid, now, started)
        # The gRPC process holds each answer while sending it (about twice its size), and no cache.
        assert memory(worker)["VmRSS"] <= started[worker] + 2 * pixel_values + SLACK

        # The HTTP process's render process renders with its own copy of the registry: the same budget.
        for seed in range(5):
            body = json_format.MessageToJson(
                encode_sample_request(SampleRequest("qwen3-vl", messages(png(side, 5000 + seed)))),
                preserving_proto_field_name=True,
            )
            request = urllib.request.Request(
                f"{server.http}/v1/render_training_sample", data=body.encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                assert response.status == 200 and response.read().startswith(b'{"sample"')
        rendering = memory(http_render_process)["VmRSS"]
        assert rendering <= started[http_render_process] + budget + SLACK, (rendering, started[http_render_process])
        # The HTTP process only passes the JSON on: no cache.
        assert memory(http)["VmRSS"] <= started[http] + SLACK, (memory(http), started[http])
