"""A tokenizer's fingerprint, to check a server tokenizes the way a trainer does.

ListModels reports the server's fingerprint for each model; a trainer computes
its own tokenizer's with `tokenizer_fingerprint(tokenizer)` and compares. Equal
fingerprints mean the same tokenization pipeline (vocabulary, merges, added
tokens, normalizer, pre-tokenizer, ...) and the same chat template. Duck-typed on
Hugging Face fast tokenizers, so this module needs no transformers import.
"""

from __future__ import annotations

import hashlib
import json

# Runtime settings that a tokenizer's serialization carries but that do not
# change how renderers tokenize text (they set them per encode call).
_RUNTIME_KEYS = ("truncation", "padding")


def tokenizer_fingerprint(tokenizer: object) -> str:
    """'sha256:<hex>' over the tokenizer's serialized pipeline and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    pipeline = json.loads(backend.to_str())
    for key in _RUNTIME_KEYS:
        pipeline.pop(key, None)
    template = getattr(tokenizer, "chat_template", None)
    digest = hashlib.sha256()
    digest.update(json.dumps(pipeline, sort_keys=True, ensure_ascii=False).encode())
    digest.update(b"\0")
    digest.update(json.dumps(template, sort_keys=True, ensure_ascii=False).encode())
    return "sha256:" + digest.hexdigest()
