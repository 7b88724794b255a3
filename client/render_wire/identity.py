"""Which replica answered a call, and what each of its models renders with: response metadata, both directions.

A server declares, on every answer, its name and a fingerprint per model that
stands for everything the model's answers depend on (the tokenizer's
fingerprint, the renderer and its config, the image processor's config):

    render-replica: gpu-node-7:50051
    render-models:  qwen3=1f0c...,qwen3-vl=9a2e...

in the trailing metadata of unary calls and the initial metadata of streams.
gRPC's round_robin hides which address a call went to; these say it, so that
a client balancing over replicas can tell when two of them would answer the
same request differently (render_client/consistency.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

REPLICA_KEY = "render-replica"
MODELS_KEY = "render-models"


@dataclass(frozen=True)
class ReplicaIdentity:
    replica: str  # the server's name: its host name and gRPC port
    models: Mapping[str, str]  # model id -> its model fingerprint


def encode_identity(replica: str, fingerprints: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The metadata a server sends with its answers."""
    # Model ids are TOML keys (any text); header values are printable ASCII without our separators.
    models = ",".join(f"{quote(model, safe='')}={fingerprint}" for model, fingerprint in fingerprints.items())
    return ((REPLICA_KEY, quote(replica, safe=":")), (MODELS_KEY, models))


def decode_identity(metadata: Sequence[tuple[str, str | bytes]] | None) -> ReplicaIdentity | None:
    """The identity an answer's metadata declares; None if it declares none (a server without it)."""
    replica = models = None
    for key, value in metadata or ():
        if key == REPLICA_KEY:
            replica = value if isinstance(value, str) else value.decode()
        elif key == MODELS_KEY:
            models = value if isinstance(value, str) else value.decode()
    if replica is None or models is None:
        return None
    return _parsed(replica, models)


@functools.lru_cache(maxsize=256)
def _parsed(replica: str, models: str) -> ReplicaIdentity:
    # Every answer of a replica carries the same two values: parse them once.
    pairs = (entry.rpartition("=") for entry in models.split(",") if entry)
    return ReplicaIdentity(unquote(replica), {unquote(model): fingerprint for model, _, fingerprint in pairs})
