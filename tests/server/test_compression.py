"""`--compression gzip`: gRPC's own message compression of answers, for links slower than the renders.

A byte-counting TCP relay sits between the client and each server, so the test
sees the bytes that travel, not what the client is handed.
"""

from __future__ import annotations

import io

from PIL import Image

from render_client import RenderClient, build_training_sample
from tests.support import ServerProcess, counting_relay, running_server


def smooth_png() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((448, 448)).save(buffer, format="PNG")
    return buffer.getvalue()


def render_through_relay(target: str) -> tuple[object, int]:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": smooth_png()}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A gradient."},
    ]
    with counting_relay(target) as (address, counted), RenderClient(address, timeout=120) as client:
        sample = build_training_sample(client.renderer("qwen3-vl"), messages)
    return sample, counted[0]


def test_gzip_answers_are_smaller_on_the_wire_and_decode_to_the_same_sample(server: ServerProcess) -> None:
    plain, plain_bytes = render_through_relay(server.target)
    with running_server("--workers", "1", "--compression", "gzip") as gzip_server:
        squeezed, gzip_bytes = render_through_relay(gzip_server.target)
    assert gzip_bytes < 0.8 * plain_bytes, (gzip_bytes, plain_bytes)
    assert plain.token_ids == squeezed.token_ids and plain.loss_mask == squeezed.loss_mask
    [plain_item] = plain.multi_modal_data.mm_items["image"]
    [squeezed_item] = squeezed.multi_modal_data.mm_items["image"]
    assert plain_item.keys() == squeezed_item.keys()
    for name, array in plain_item.items():
        assert array.dtype == squeezed_item[name].dtype and array.shape == squeezed_item[name].shape
        assert array.tobytes() == squeezed_item[name].tobytes(), name
