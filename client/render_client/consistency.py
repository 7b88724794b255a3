"""One tokenizer per model across replicas: a client never mixes answers of replicas that disagree.

A client balancing over replicas (round_robin over a headless Service's pods)
gets each answer from whichever replica took the call. If two replicas load
different tokenizer files (or renderer configs) under one model id, say a
branch moved between their start-ups, the same conversation renders to
different token ids depending on where it went, silently. So every answer
says which replica made it and what that replica's model renders with
(render_wire/identity.py), and the client checks it before handing it on.

The design: refuse, never pick. The first answer for a model pins the model's
fingerprint and the replica that gave it, for the client's lifetime (pins cross
pickling, so DataLoader workers share their parent's). An answer from a replica
whose fingerprint differs is not returned: the call raises ReplicaMismatchError
naming both replicas and both fingerprints (a stream yields it in that request's
place). A client cannot tell which side is right, and routing around one side
would keep a trainer running on whichever replicas it happened to meet first;
the fleet needs fixing (deploy/README.md, "One tokenizer per model"), and a
trainer restarted after the fix pins afresh. Answers of servers that declare
nothing (older versions) are not checked.
"""

from __future__ import annotations

import grpc

from render_wire.errors import RenderError
from render_wire.identity import ReplicaIdentity


class ReplicaMismatchError(RenderError):
    """Two replicas behind one client render a model differently; the answer was not used."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409

    def __reduce__(self) -> tuple[object, ...]:
        return (ReplicaMismatchError, (self.details,))


class Pins:
    """Each model's fingerprint, and the replica it came from, as the client first met them."""

    def __init__(self) -> None:
        self._pins: dict[str, tuple[str, str]] = {}  # model -> (fingerprint, replica)

    def check(self, model: str, identity: ReplicaIdentity | None) -> ReplicaMismatchError | None:
        """The error for an answer about `model` from the replica `identity` declares, or None if it may be used."""
        if identity is None:
            return None
        fingerprint = identity.models.get(model)
        if fingerprint is None:  # it has no such model: its answer is an error anyway
            return None
        # setdefault is atomic (one dict operation): threads that race pin the same first answer.
        pinned, first = self._pins.setdefault(model, (fingerprint, identity.replica))
        if pinned == fingerprint:
            return None
        return ReplicaMismatchError(
            f"model {model!r}: replica {identity.replica} renders it with fingerprint {fingerprint}, but this "
            f"client's answers so far came from replica {first} with {pinned}; the replicas load different "
            "tokenizer files or renderer configs under one id, and their answers are not mixed "
            "(compare ListModels on each; see deploy/README.md, 'One tokenizer per model')"
        )

    def require(self, model: str, identity: ReplicaIdentity | None) -> None:
        """`check`, raising the mismatch."""
        mismatch = self.check(model, identity)
        if mismatch is not None:
            raise mismatch

    def pinned(self) -> dict[str, tuple[str, str]]:
        """model -> (fingerprint, replica), as pinned so far."""
        return dict(self._pins)
