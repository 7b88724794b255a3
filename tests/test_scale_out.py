"""Scale-out: one client over three replicas with gRPC's own round_robin; losing one loses no request."""

from __future__ import annotations

import re
import time
import urllib.request

from render_client import RenderClient
from tests.support import Load, ServerProcess, corpus, running_server


def served(server: ServerProcess) -> float:
    """RenderTrainingSample calls a replica has answered OK, from its /metrics."""
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(
        float(value)
        for value in re.findall(
            r'^render_requests_total\{code="OK",method="RenderTrainingSample",model="qwen3"\} (\S+)$', text, re.M
        )
    )


def test_round_robin_spreads_load_and_survives_a_lost_replica() -> None:
    conversations = [c for c in corpus() if "images" not in c["tags"]][:30]
    with (
        running_server("--workers", "1") as first,
        running_server("--workers", "1") as second,
        running_server("--workers", "1") as third,
    ):
        replicas = [first, second, third]
        # A static address list: round_robin over all three (a headless Service's DNS name works alike).
        with RenderClient([replica.target for replica in replicas], timeout=60) as client:
            renderer = client.renderer("qwen3")
            load = Load(
                client, [renderer.request(c["messages"], tools=c.get("tools")) for c in conversations], threads=6
            )
            load.start()
            time.sleep(4)
            before = [served(replica) for replica in replicas]
            third.kill()
            killed_at = time.monotonic()
            time.sleep(4)
            outcomes = load.join()
            after = [served(replica) for replica in replicas[:2]]
    total = sum(before)
    # Spread: every replica took a fair share, none most of it.
    assert all(count > total / 6 for count in before), before
    assert all(count < total * 0.6 for count in before), before
    # Nothing lost: calls in flight on the dead replica were retried on the others.
    assert [str(o.error) for o in outcomes if o.error] == []
    assert sum(o.started > killed_at for o in outcomes) > 20
    assert all(now > then for now, then in zip(after, before, strict=False))


def test_connections_are_recycled_without_failing_a_call() -> None:
    # --max-connection-age makes clients reconnect (and re-resolve) now and then;
    # calls in flight finish, later ones go over a new connection, none fail.
    conversations = [c for c in corpus() if "images" not in c["tags"]][:10]
    with (
        running_server("--workers", "1", "--max-connection-age", "1") as server,
        RenderClient(server.target, timeout=60) as client,
    ):
        renderer = client.renderer("qwen3")
        load = Load(client, [renderer.request(c["messages"]) for c in conversations], threads=4).start()
        time.sleep(5)
        outcomes = load.join()
        streamed = list(client.render_many([renderer.request(c["messages"]) for c in conversations] * 30))
    assert len(outcomes) > 50 and [str(o.error) for o in outcomes if o.error] == []
    assert len(streamed) == 300
