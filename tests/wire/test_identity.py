"""render_wire.identity: what a replica declares with its answers, both directions."""

from __future__ import annotations

from render_wire.identity import MODELS_KEY, REPLICA_KEY, ReplicaIdentity, decode_identity, encode_identity


def test_a_replicas_identity_round_trips_whatever_its_model_ids() -> None:
    models = {"qwen3": "0123456789abcdef", "odd, id=1/é": "fedcba9876543210", "": "00"}
    metadata = encode_identity("pod-7.render:50051", models)
    assert [key for key, _ in metadata] == [REPLICA_KEY, MODELS_KEY]
    assert all(value.isascii() and value.isprintable() for _, value in metadata)  # valid header values
    assert decode_identity(metadata) == ReplicaIdentity("pod-7.render:50051", models)
    # As gRPC hands them over: among other metadata, values maybe bytes.
    mixed = [("other", "x"), *((key, value.encode()) for key, value in metadata)]
    assert decode_identity(mixed) == ReplicaIdentity("pod-7.render:50051", models)


def test_answers_that_declare_nothing_have_no_identity() -> None:
    assert decode_identity(None) is None
    assert decode_identity([("render-error-type", "ValueError")]) is None
    assert decode_identity([(REPLICA_KEY, "a:1")]) is None
