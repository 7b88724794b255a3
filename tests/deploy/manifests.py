"""deploy/k8s as Kubernetes receives it: `kustomize build` of the base or an overlay, by kind."""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT, tool

K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"


def build(folder: Path) -> str:
    """`kustomize build folder`: the YAML stream `kubectl apply -k folder` applies."""
    answered = subprocess.run(
        [tool("kustomize"), "build", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert answered.returncode == 0, answered.stderr
    return answered.stdout


@dataclass(frozen=True)
class Manifests:
    """The objects of one build, one of each kind."""

    text: str
    by_kind: dict[str, dict[str, Any]]

    @property
    def container(self) -> dict[str, Any]:
        (only,) = self.by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
        return only

    @property
    def pod(self) -> dict[str, Any]:
        return self.by_kind["Deployment"]["spec"]["template"]["spec"]

    def port(self, name: str) -> int:
        (port,) = [port["containerPort"] for port in self.container["ports"] if port["name"] == name]
        return port

    def probe(self, kind: str) -> dict[str, Any]:
        """A probe of the container ("readinessProbe", ...) as the kubelet runs it: scheme, port number, path."""
        get = self.container[kind]["httpGet"]
        port = get["port"] if isinstance(get["port"], int) else self.port(get["port"])
        return {**self.container[kind], "scheme": get.get("scheme", "HTTP"), "port": port, "path": get["path"]}


@cache
def manifests(folder: Path = BASE) -> Manifests:
    text = build(folder)
    by_kind: dict[str, dict[str, Any]] = {}
    for document in yaml.safe_load_all(text):
        if document is None:
            continue
        assert document["kind"] not in by_kind, f"two {document['kind']} objects"
        by_kind[document["kind"]] = document
    return Manifests(text, by_kind)


@dataclass(frozen=True)
class ProbeResult:
    success: bool
    status: int | None  # HTTP status; None: no answer in time, or no connection
    seconds: float


def run_probe(probe: dict[str, Any], host: str, port: int) -> ProbeResult:
    """An httpGet probe (`Manifests.probe`) as the kubelet runs it, against `host:port` standing in for the pod's.

    Success is a status from 200 to 399 within timeoutSeconds; HTTPS is not verified.
    """
    context = ssl._create_unverified_context() if probe["scheme"] == "HTTPS" else None
    url = f"{probe['scheme'].lower()}://{host}:{port}{probe['path']}"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1), context=context) as response:
            status: int | None = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, TimeoutError):
        status = None
    seconds = time.monotonic() - started
    return ProbeResult(status is not None and 200 <= status < 400, status, seconds)
