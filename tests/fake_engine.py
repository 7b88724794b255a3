"""A vLLM stand-in on loopback, for rollouts through `renderers.client.generate`.

It answers what renderers' generate client asks of vLLM: `GET /v1/models` (the
context length) and `POST /inference/v1/generate`. Each generate gets the next
of the completions it was given (token ids the test made by rendering known
replies), with a logprob per token. For a request with `content_parts` (a
renderer told process_multimodal=False left each image as one placeholder), it
expands each image's placeholder as vLLM's Qwen-VL processor does, from the
image the part's data: URI holds, and answers the expanded prompt and the
placeholder ranges. Every request body is kept, for the test to compare.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

# How many placeholder tokens an image takes: the engine's processor.
ImageTokens = Callable[[Image.Image], int]


class FakeEngine:
    """The engine's state: the model it serves, the completions still to give, the requests seen."""

    def __init__(
        self,
        model: str,
        completions: list[list[int]],
        *,
        max_model_len: int = 65536,
        image_pad: int | None = None,
        image_tokens: ImageTokens | None = None,
    ) -> None:
        self.model = model
        self.completions = list(completions)
        self.max_model_len = max_model_len
        self.image_pad = image_pad
        self.image_tokens = image_tokens
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests.append(body)
            index = len(self.requests) - 1
            completion = self.completions.pop(0)
        answer: dict[str, Any] = {
            "request_id": f"fake-{index}",
            "choices": [
                {
                    "token_ids": completion,
                    "finish_reason": "stop",
                    "logprobs": {
                        "content": [
                            {"token": f"token_id:{token}", "logprob": -0.25 - (position % 7) / 8}
                            for position, token in enumerate(completion)
                        ]
                    },
                }
            ],
        }
        if body.get("content_parts"):
            prompt, placeholders = self._expand(body["token_ids"], body["content_parts"])
            answer["prompt_token_ids"] = prompt
            answer["mm_placeholders"] = {"image": placeholders}
        return answer

    def _expand(self, token_ids: list[int], parts: list[dict[str, Any]]) -> tuple[list[int], list[dict[str, int]]]:
        """Each image's single placeholder token, repeated as many times as the image takes."""
        assert self.image_pad is not None and self.image_tokens is not None, "an engine without images"
        counts = [self.image_tokens(_image(part["url"])) for part in parts if part["type"] == "image_url"]
        expanded: list[int] = []
        placeholders = []
        for token in token_ids:
            if token == self.image_pad:
                count = counts.pop(0)
                placeholders.append({"offset": len(expanded), "length": count})
                expanded.extend([token] * count)
            else:
                expanded.append(token)
        assert not counts, "more images than placeholders"
        return expanded, placeholders


def _image(url: str) -> Image.Image:
    assert url.startswith("data:"), "this engine opens data: URIs only"
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")


@contextmanager
def serving(engine: FakeEngine) -> Iterator[str]:
    """`engine` on a loopback port; yields its OpenAI base URL (http://127.0.0.1:PORT/v1)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                self.send_error(404)
                return
            self._answer({"object": "list", "data": [{"id": engine.model, "max_model_len": engine.max_model_len}]})

        def do_POST(self) -> None:
            if self.path != "/inference/v1/generate":
                self.send_error(404)
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._answer(engine.generate(body))

        def _answer(self, document: dict[str, Any]) -> None:
            data = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
