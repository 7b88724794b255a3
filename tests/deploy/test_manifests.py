"""deploy/k8s: valid Kubernetes objects (kubeconform -strict, offline schemas) that kube-score finds nothing in,
that fit together, fit the image, and stay within their own sizing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from render_server import metrics
from render_server.cli import parse_args
from render_server.config import load_config
from render_server.sizing import Sizing
from tests.deploy import dockerfile
from tests.deploy.kubeschemas import KUBERNETES_VERSIONS, crd_schema_location, schema_location
from tests.deploy.manifests import BASE, K8S, PRODUCTION, Manifests, build, manifests
from tests.support import ROOT, tool

BASE_KINDS = {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
PRODUCTION_KINDS = BASE_KINDS | {"PodMonitor"}
BUILDS = {"base": (BASE, BASE_KINDS), "production": (PRODUCTION, PRODUCTION_KINDS)}


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
            "-schema-location",
            crd_schema_location(),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return answered.returncode, json.loads(answered.stdout)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- kubeconform, strict, against real Kubernetes schemas and the PodMonitor's CRD ---


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", BUILDS)
def test_the_manifests_are_valid_kubernetes_objects(name: str, version: str, tmp_path: Path) -> None:
    folder, kinds = BUILDS[name]
    returncode, report = kubeconform(version, write(tmp_path, f"{name}.yaml", build(folder)))
    problems = [f"{r['kind']} {r['name']}: {r['msg']}" for r in report["resources"] if r["status"] != "statusValid"]
    assert returncode == 0 and not problems, "\n".join(problems)
    assert report["summary"] == {"valid": len(kinds), "invalid": 0, "errors": 0, "skipped": 0}
    assert {r["kind"] for r in report["resources"]} == kinds


def _first_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


MUTATIONS: dict[str, tuple[str, str, Callable[[dict[str, Any]], None]]] = {
    # A misspelt or misplaced field: only a strict schema refuses it.
    "unknown container field": (
        "Deployment",
        "imagePullPolicyy",
        lambda d: _first_container(d).update(imagePullPolicyy="Always"),
    ),
    "unknown probe field": (
        "Deployment",
        "pathh",
        lambda d: _first_container(d)["readinessProbe"]["httpGet"].update(pathh="/readyz"),
    ),
    "wrong type": ("Deployment", "/spec/revisionHistoryLimit", lambda d: d["spec"].update(revisionHistoryLimit="five")),
    "an API version Kubernetes no longer serves": (
        "Deployment",
        "could not find schema",
        lambda d: d.update(apiVersion="extensions/v1beta1"),
    ),
    # The custom resource's schema is the CRD's, strict too.
    "unknown PodMonitor field": (
        "PodMonitor",
        "intervall",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(intervall="30s"),
    ),
    "wrong PodMonitor type": (
        "PodMonitor",
        "podMetricsEndpoints",
        lambda d: d["spec"].update(podMetricsEndpoints={"port": "http"}),
    ),
}


@pytest.mark.parametrize("mutation", [*MUTATIONS, "duplicate key"])
def test_the_validation_refuses_a_broken_object(mutation: str, tmp_path: Path) -> None:
    # The check above means something only if the same validation refuses these.
    if mutation == "duplicate key":
        kind, expected = "Deployment", "already set"
        text = yaml.safe_dump(manifests(PRODUCTION).by_kind[kind]) + "kind: Deployment\n"
    else:
        kind, expected, change = MUTATIONS[mutation]
        document = json.loads(json.dumps(manifests(PRODUCTION).by_kind[kind]))
        change(document)
        text = yaml.safe_dump(document)
    returncode, report = kubeconform(KUBERNETES_VERSIONS[0], write(tmp_path, "broken.yaml", text))
    assert returncode != 0
    (resource,) = report["resources"]
    assert resource["status"] != "statusValid" and expected in resource["msg"], resource


# --- kube-score: no findings, or an exception justified beside it ---

# Its default checks and these optional ones (Guaranteed QoS, seccomp, ports).
KUBE_SCORE_OPTIONAL = (
    "container-resource-requests-equal-limits",
    "container-cpu-requests-equal-limits",
    "container-memory-requests-equal-limits",
    "container-ephemeral-storage-request-equals-limit",
    "container-seccomp-profile",
    "container-ports-check",
)


def kube_score(path: Path) -> tuple[int, str]:
    options = [argument for check in KUBE_SCORE_OPTIONAL for argument in ("--enable-optional-test", check)]
    answered = subprocess.run(
        [tool("kube-score"), "score", "--output-format", "ci", *options, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return answered.returncode, answered.stdout + answered.stderr


@pytest.mark.parametrize("name", BUILDS)
def test_kube_score_finds_nothing(name: str, tmp_path: Path) -> None:
    returncode, report = kube_score(write(tmp_path, f"{name}.yaml", build(BUILDS[name][0])))
    findings = [line for line in report.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))]
    assert returncode == 0 and not findings, report


def test_kube_score_finds_what_it_should(tmp_path: Path) -> None:
    # The check above means something only if kube-score, run the same way, finds these.
    deployment = json.loads(json.dumps(manifests(BASE).by_kind["Deployment"]))
    del _first_container(deployment)["resources"]["limits"]
    deployment["metadata"]["annotations"] = {}
    _, report = kube_score(write(tmp_path, "deployment.yaml", yaml.safe_dump(deployment)))
    found = [line for line in report.splitlines() if line.startswith("[CRITICAL]")]
    # Alone, without its PDB and NetworkPolicy, and with its limits and exceptions gone:
    for expected in (
        "Memory limit is not set",
        "ImagePullPolicy is not set to Always",
        "No matching PodDisruptionBudget",
    ):
        assert any(expected in line for line in found), (expected, report)


def test_every_kube_score_exception_is_justified_beside_it() -> None:
    ignored = manifests(BASE).by_kind["Deployment"]["metadata"]["annotations"]["kube-score/ignore"].split(",")
    source = (BASE / "deployment.yaml").read_text(encoding="utf-8")
    justified = set(re.findall(r"^    # - ([a-z-]+)[ :(]", source, re.M))
    assert ignored and set(ignored) == justified, (ignored, justified)


# --- how the objects fit together ---


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert [file for generator in kustomization["configMapGenerator"] for file in generator["files"]] == ["models.toml"]
    assert set(manifests(BASE).by_kind) == BASE_KINDS
    assert set(manifests(PRODUCTION).by_kind) == PRODUCTION_KINDS


def test_every_probe_asks_the_health_process() -> None:
    for build_ in (manifests(BASE), manifests(PRODUCTION)):
        probes = {kind: build_.probe(kind) for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        args = server_args(build_)
        for kind, probe in probes.items():
            assert set(build_.container[kind]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"httpGet"}, kind
            # The health port render-server serves with --health-port, plaintext with TLS on too.
            assert probe["port"] == build_.port("health") == args.health_port, kind
            assert probe["scheme"] == "HTTP", kind
        assert probes["readinessProbe"]["path"] == "/readyz"
        assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
        # Loading every model may take minutes: start-up allows ten.
        assert probes["startupProbe"]["failureThreshold"] * probes["startupProbe"]["periodSeconds"] >= 600
        # Liveness never fails a pod faster than a minute: a worker silent for that long (status.py).
        assert probes["livenessProbe"]["failureThreshold"] * probes["livenessProbe"]["periodSeconds"] >= 60
    assert server_args(manifests(PRODUCTION)).tls_cert is not None  # the probes above work with TLS on


def test_the_pod_runs_as_the_images_non_root_user_read_only() -> None:
    built = manifests(BASE)
    assert built.pod["securityContext"]["runAsNonRoot"] is True
    assert built.pod["securityContext"]["runAsUser"] == dockerfile.uid() != 0
    assert built.pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = built.container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    # What the server writes goes to volumes: /tmp and $HF_HOME's volume.
    mounts = {mount["mountPath"]: mount for mount in built.container["volumeMounts"]}
    assert "/tmp" in mounts
    assert any(dockerfile.env("HF_HOME").startswith(path + "/") for path in mounts)


def server_args(built: Manifests) -> Any:
    """The Deployment's arguments as render-server reads them (after the image's entrypoint)."""
    entrypoint = json.loads(dockerfile.last("ENTRYPOINT"))
    assert entrypoint[0] == "render-server"
    return parse_args([*entrypoint[1:], *built.container["args"]])


@pytest.mark.parametrize("name", BUILDS)
def test_memory_is_guaranteed_and_is_the_worst_case_of_the_flags(name: str) -> None:
    built = manifests(BUILDS[name][0])
    resources = built.container["resources"]
    # Guaranteed QoS: requests equal limits, CPU and memory.
    for kind in ("cpu", "memory"):
        assert resources["requests"][kind] == resources["limits"][kind], kind
    # The memory is the sizing formula's worst case for the flags the pod runs with...
    args = server_args(built)
    assert args.workers >= 1 and "--workers" in built.container["args"], "--workers defaults to the node's CPUs"
    assert resources["limits"]["memory"] == Sizing.from_args(args).memory_quantity()
    # ...and one worker per CPU of the limit.
    assert quantity(resources["limits"]["cpu"]) == args.workers


def test_the_sizing_check_refuses_a_manifest_that_outgrew_its_memory() -> None:
    # The check above means something: a larger image limit, or one more worker, needs more memory.
    args = server_args(manifests(BASE))
    memory = manifests(BASE).container["resources"]["limits"]["memory"]
    for flag, value in (("--max-image-pixels", str(2 * args.max_image_pixels)), ("--workers", str(args.workers + 1))):
        grown = parse_args([*manifests(BASE).container["args"], flag, value])
        assert Sizing.from_args(grown).memory_quantity() != memory, flag


def test_the_registry_comes_from_the_generated_configmap_and_loads(tmp_path: Path) -> None:
    built = manifests(BASE)
    args = built.container["args"]
    config_path = Path(args[args.index("--config") + 1])
    mounts = {mount["name"]: mount for mount in built.container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in built.pod["volumes"]}
    (registry,) = [name for name, volume in volumes.items() if "configMap" in volume]
    configmap = built.by_kind["ConfigMap"]
    assert volumes[registry]["configMap"]["name"] == configmap["metadata"]["name"]
    assert configmap["metadata"]["name"].startswith("render-service-models-")  # the generator's hash suffix
    assert mounts[registry]["readOnly"] is True
    assert config_path.parent == Path(mounts[registry]["mountPath"])
    document = configmap["data"][config_path.name]
    assert document == (BASE / "models.toml").read_text(encoding="utf-8")
    # The registry is one render-server loads; local model files are on the models volume.
    models = load_config(write(tmp_path, config_path.name, document))
    assert {model.id for model in models} >= {"qwen3", "deepseek-v4"}
    model_volume = Path(mounts["models"]["mountPath"])
    for model in models:
        for source in (model.tokenizer, model.image_processor):
            if source is not None and source.path is not None:
                assert model_volume in source.path.parents, f"{model.id}: {source.path}"


def test_editing_the_registry_rolls_the_deployment(tmp_path: Path) -> None:
    # The ConfigMap's name carries a hash of models.toml, and the pod template names
    # the ConfigMap: an edit changes the template, which is what starts a rollout.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    before = manifests(BASE)
    models = copy / "base" / "models.toml"
    models.write_text(models.read_text(encoding="utf-8") + '\n[models.qwen3-again]\nrenderer = "qwen3"\n')
    after_text = build(copy / "base")
    after = {d["kind"]: d for d in yaml.safe_load_all(after_text) if d}
    old_name = before.by_kind["ConfigMap"]["metadata"]["name"]
    new_name = after["ConfigMap"]["metadata"]["name"]
    assert new_name != old_name
    template = after["Deployment"]["spec"]["template"]
    assert template != before.by_kind["Deployment"]["spec"]["template"]
    assert new_name in json.dumps(template) and old_name not in json.dumps(template)
    # The rollout keeps every pod until its replacement is ready.
    strategy = after["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] not in (0, "0%")


def test_the_headless_service_selects_the_pods_by_port_name() -> None:
    built = manifests(BASE)
    service = built.by_kind["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service.get("publishNotReadyAddresses", False) is False
    labels = built.by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert built.by_kind["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert built.by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {port["name"]: port["containerPort"] for port in built.container["ports"]}
    ports = {port["name"]: port for port in service["ports"]}
    assert set(ports) == {"grpc", "http"} == set(container_ports) - {"health"}  # health: the kubelet's only
    for name, port in ports.items():
        assert port["targetPort"] in (name, container_ports[name])
    assert ports["grpc"]["port"] == container_ports["grpc"] == 50051


def test_the_autoscaler_scales_the_deployment_on_cpu_and_calls_in_flight() -> None:
    for build_ in (manifests(BASE), manifests(PRODUCTION)):
        hpa = build_.by_kind["HorizontalPodAutoscaler"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": build_.by_kind["Deployment"]["apiVersion"],
            "kind": "Deployment",
            "name": build_.by_kind["Deployment"]["metadata"]["name"],
        }
        cpu = hpa["spec"]["metrics"][0]
        assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
        assert cpu["resource"]["target"]["type"] == "Utilization"
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # Utilization is relative to the request, and the autoscaler owns the replica count.
        assert "cpu" in build_.container["resources"]["requests"]
        assert "replicas" not in build_.by_kind["Deployment"]["spec"]
    # With Prometheus (and its adapter), the calls in flight per pod too: the server's own metric.
    assert len(manifests(BASE).by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]) == 1
    _, in_flight = manifests(PRODUCTION).by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert in_flight["type"] == "Pods"
    assert in_flight["pods"]["metric"]["name"] == metrics.IN_FLIGHT._name  # type: ignore[attr-defined]
    assert in_flight["pods"]["target"]["type"] == "AverageValue"
    # Half the handler threads of a pod's workers: a stream holds one while open.
    args = server_args(manifests(PRODUCTION))
    assert quantity(in_flight["pods"]["target"]["averageValue"]) == args.workers * args.threads / 2


def test_a_disruption_takes_a_tenth_to_a_quarter_of_the_pods() -> None:
    pdb = manifests(BASE).by_kind["PodDisruptionBudget"]["spec"]
    assert "minAvailable" not in pdb
    percent = re.fullmatch(r"(\d+)%", pdb["maxUnavailable"])
    assert percent and 10 <= int(percent.group(1)) <= 25, pdb["maxUnavailable"]


def test_the_pods_spread_over_zones_and_nodes() -> None:
    built = manifests(BASE)
    labels = built.by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in built.pod["topologySpreadConstraints"]}
    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
        assert constraint["maxSkew"] == 1


def test_the_network_policy_lets_in_only_labelled_clients_and_monitoring() -> None:
    built = manifests(BASE)
    policy = built.by_kind["NetworkPolicy"]["spec"]
    labels = built.by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    clients, monitoring = policy["ingress"]
    assert clients["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"render-service/client": "true"}}}
    ]
    assert {port["port"] for port in clients["ports"]} == {"grpc", "http"}
    (source,) = monitoring["from"]
    assert set(source) == {"namespaceSelector"}  # every pod of that namespace, no other namespace
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert [port["port"] for port in monitoring["ports"]] == ["http"]
    # Nothing reaches the health port but the kubelet (from the node, which policies always let through).
    assert "health" not in {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    # Egress: DNS only (deploy/README.md says how to open the hub).
    assert {port["port"] for rule in policy["egress"] for port in rule["ports"]} == {53}


def test_tls_and_tokens_come_from_secrets() -> None:
    built = manifests(PRODUCTION)
    args = server_args(built)
    mounts = {mount["name"]: mount for mount in built.container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in built.pod["volumes"] if "secret" in v}
    assert set(secrets.values()) == {"render-service-tls", "render-service-tokens"}
    for path in (args.tls_cert, args.tls_key, args.auth_tokens_file):
        (volume,) = [name for name, mount in mounts.items() if path.parent == Path(mount["mountPath"])]
        assert volume in secrets and mounts[volume]["readOnly"] is True, path
    assert args.tls_client_ca is None  # the kubelet's probes carry no client certificate
    # The overlay appends to the base's flags: the sized ones stay as they are.
    assert built.container["args"][: len(manifests(BASE).container["args"])] == manifests(BASE).container["args"]
    # Prometheus scrapes over HTTPS too.
    (endpoint,) = built.by_kind["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["name"] == "render-service-tls"


def test_prometheus_scrapes_every_pods_metrics() -> None:
    built = manifests(PRODUCTION)
    monitor = built.by_kind["PodMonitor"]["spec"]
    labels = built.by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"


def test_termination_leaves_time_to_drain() -> None:
    built = manifests(BASE)
    grace = server_args(built).grace
    pre_stop = built.container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert built.pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5


def test_the_container_ports_are_the_images() -> None:
    exposed = {int(port) for port in dockerfile.last("EXPOSE").split()}
    assert exposed == {port["containerPort"] for port in manifests(BASE).container["ports"]}


def test_the_deploy_readme_describes_every_manifest() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    files = [path.relative_to(K8S) for path in K8S.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert f"`{path.name}`" in readme, f"deploy/README.md does not describe {path}"


# --- helpers ---


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "4Gi", 2) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    number, suffix = match.groups()
    return float(number) * (_SUFFIXES[suffix] if suffix else 1)
