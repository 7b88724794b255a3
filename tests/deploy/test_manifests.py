"""deploy/k8s: valid Kubernetes objects (kubeconform -strict, offline schemas) that fit together and fit the image."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from render_server.config import load_config
from tests.deploy import dockerfile
from tests.deploy.kubeschemas import KUBERNETES_VERSIONS, schema_location
from tests.support import ROOT, tool

K8S = ROOT / "deploy" / "k8s"
KINDS = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def objects() -> dict[str, dict[str, Any]]:
    """Every object of the manifests, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is None:
                continue
            assert document["kind"] not in found, f"two {document['kind']} objects"
            found[document["kind"]] = document
    return found


def container() -> dict[str, Any]:
    (only,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def grpc_port() -> int:
    (port,) = [port["containerPort"] for port in container()["ports"] if port["name"] == "grpc"]
    return port


def kubeconform(version: str, *files: Path) -> tuple[int, dict[str, Any]]:
    answered = subprocess.run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-verbose",
            "-output",
            "json",
            "-kubernetes-version",
            version,
            "-schema-location",
            schema_location(),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return answered.returncode, json.loads(answered.stdout)


# --- kubeconform, strict, against real Kubernetes schemas ---


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_kubernetes_objects(version: str) -> None:
    returncode, report = kubeconform(version, *manifest_files())
    problems = [f"{r['filename']}: {r['kind']} {r['msg']}" for r in report["resources"] if r["status"] != "statusValid"]
    assert returncode == 0 and not problems, "\n".join(problems)
    assert report["summary"] == {"valid": len(KINDS), "invalid": 0, "errors": 0, "skipped": 0}
    assert {r["kind"] for r in report["resources"]} == KINDS


def _first_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


MUTATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    # A misspelt or misplaced field: only a strict schema refuses it.
    "unknown container field": ("imagePullPolicyy", lambda d: _first_container(d).update(imagePullPolicyy="Always")),
    "unknown probe field": (
        "servise",
        lambda d: _first_container(d)["readinessProbe"]["grpc"].update(servise="render.v1.RenderService"),
    ),
    "wrong type": ("/spec/revisionHistoryLimit", lambda d: d["spec"].update(revisionHistoryLimit="five")),
    "an API version Kubernetes no longer serves": (
        "could not find schema",
        lambda d: d.update(apiVersion="extensions/v1beta1"),
    ),
}


@pytest.mark.parametrize("mutation", [*MUTATIONS, "duplicate key"])
def test_the_validation_refuses_a_broken_deployment(mutation: str, tmp_path: Path) -> None:
    # The check above means something only if the same validation refuses these.
    text = (K8S / "deployment.yaml").read_text(encoding="utf-8")
    if mutation == "duplicate key":
        expected, text = "already set", text + "kind: Deployment\n"
    else:
        expected, change = MUTATIONS[mutation]
        deployment = yaml.safe_load(text)
        change(deployment)
        text = yaml.safe_dump(deployment)
    broken = tmp_path / "deployment.yaml"
    broken.write_text(text, encoding="utf-8")
    returncode, report = kubeconform(KUBERNETES_VERSIONS[0], broken)
    assert returncode != 0
    (resource,) = report["resources"]
    assert resource["status"] != "statusValid" and expected in resource["msg"], resource


# --- how the objects fit together ---


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == sorted(path.name for path in manifest_files())
    assert set(objects()) == KINDS


def test_every_probe_asks_the_grpc_health_service_on_the_grpc_port() -> None:
    serving = container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(serving[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert serving[probe]["grpc"] == {"port": grpc_port()}, probe  # no service: the server's overall status
    # Liveness never fails a pod before start-up may have ended, nor faster than readiness.
    assert serving["livenessProbe"]["failureThreshold"] * serving["livenessProbe"]["periodSeconds"] >= 30


def test_the_pod_runs_as_the_images_non_root_user_read_only() -> None:
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile.uid() != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    # What the server writes goes to volumes: /tmp and $HF_HOME's volume.
    mounts = {mount["mountPath"]: mount for mount in container()["volumeMounts"]}
    assert "/tmp" in mounts
    assert any(dockerfile.env("HF_HOME").startswith(path + "/") for path in mounts)


def test_resources_are_requested_and_limited() -> None:
    resources = container()["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind]), kind
    # The server starts one worker per CPU of its quota: a CPU limit keeps that to the request.
    assert quantity(resources["limits"]["cpu"]) >= 1


def test_the_registry_comes_from_the_configmap_and_loads(tmp_path: Path) -> None:
    everything = objects()
    args = container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {mount["name"]: mount for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in everything["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    (registry,) = [name for name, volume in volumes.items() if "configMap" in volume]
    assert volumes[registry]["configMap"]["name"] == everything["ConfigMap"]["metadata"]["name"]
    assert mounts[registry]["readOnly"] is True
    assert config_path.parent == Path(mounts[registry]["mountPath"])
    document = everything["ConfigMap"]["data"][config_path.name]
    # The registry is one render-server loads; local model files are on the models volume.
    written = tmp_path / config_path.name
    written.write_text(document, encoding="utf-8")
    models = load_config(written)
    assert {model.id for model in models} >= {"qwen3", "deepseek-v4"}
    model_volume = Path(mounts["models"]["mountPath"])
    for model in models:
        for source in (model.tokenizer, model.image_processor):
            if source is not None and source.path is not None:
                assert model_volume in source.path.parents, f"{model.id}: {source.path}"


def test_the_headless_service_selects_the_pods_by_port_name() -> None:
    everything = objects()
    service = everything["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service.get("publishNotReadyAddresses", False) is False
    labels = everything["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert everything["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert everything["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    ports = {port["name"]: port for port in service["ports"]}
    assert set(ports) == {"grpc", "http"} == set(container_ports)
    for name, port in ports.items():
        assert port["targetPort"] in (name, container_ports[name])
    assert ports["grpc"]["port"] == container_ports["grpc"] == 50051


def test_the_autoscaler_scales_the_deployment_on_cpu() -> None:
    everything = objects()
    hpa = everything["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": everything["Deployment"]["apiVersion"],
        "kind": "Deployment",
        "name": everything["Deployment"]["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization is relative to the request, and the autoscaler owns the replica count.
    assert "cpu" in container()["resources"]["requests"]
    assert "replicas" not in everything["Deployment"]["spec"]
    assert everything["PodDisruptionBudget"]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_termination_leaves_time_to_drain() -> None:
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    args = container()["args"]
    grace = float(args[args.index("--grace") + 1]) if "--grace" in args else 10.0  # render-server's default
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5


def test_the_container_ports_are_the_images() -> None:
    exposed = {int(port) for port in dockerfile.last("EXPOSE").split()}
    assert exposed == {port["containerPort"] for port in container()["ports"]}


# --- helpers ---


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "4Gi", 2) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    number, suffix = match.groups()
    return float(number) * (_SUFFIXES[suffix] if suffix else 1)
