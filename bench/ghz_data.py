"""Request data for ghz: corpus conversations as RenderTrainingSample JSON.

    python -m bench.ghz_data [--out FILE] [--models qwen3,qwen3-vl] [--conversations FILE]

Writes a JSON array of requests in the protobuf JSON mapping (images as base64
bytes; a few MB for the corpus) to --out, by default ghz-requests.json in the
temporary folder (/tmp), outside the checkout; ghz sends them round-robin.
Conversations a model's renderer refuses are left out, so that a run's errors
are the server's, not the data's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import renderers
from google.protobuf import json_format

from render_wire.requests import encode_request
from tests.reference import reference_renderer
from tests.support import corpus


def requests_for(models: list[str], conversations: list[dict]) -> list[dict]:
    out = []
    for model in models:
        renderer = reference_renderer(model)
        for conversation in conversations:
            try:
                renderers.build_training_sample(renderer, conversation["messages"], tools=conversation.get("tools"))
            except Exception:
                continue
            request = encode_request(model, conversation["messages"], tools=conversation.get("tools"))
            out.append(json_format.MessageToDict(request, preserving_proto_field_name=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ghz-requests.json",
        help="where to write the requests (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        default="qwen3,qwen3-vl,deepseek-v4",
        help="default-registry model ids, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--conversations", type=Path, help="JSONL of {messages, tools} (default: tests/fixtures/conversations.jsonl)"
    )
    args = parser.parse_args()
    if args.conversations:
        conversations = [json.loads(line) for line in args.conversations.read_text().splitlines() if line.strip()]
    else:
        conversations = list(corpus())
    requests = requests_for(args.models.split(","), conversations)
    args.out.write_text(json.dumps(requests))
    print(f"wrote {len(requests)} requests to {args.out}")


if __name__ == "__main__":
    main()
