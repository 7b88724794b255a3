"""The Dockerfile and .dockerignore, read without building (test_container.py builds and runs the image)."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy import dockerfile
from tests.support import ROOT


def server_help() -> str:
    answered = subprocess.run(
        [sys.executable, "-m", "render_server", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert answered.returncode == 0, answered.stderr
    return answered.stdout


def test_both_stages_build_on_one_configurable_public_base() -> None:
    (base,) = dockerfile.arguments("ARG")[:1]
    assert base.startswith("BASE_IMAGE=python:3.11-slim")
    assert [stage.split()[0] for stage in dockerfile.arguments("FROM")] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]


def test_the_project_is_installed_pinned_and_not_editable() -> None:
    (install,) = [run for run in dockerfile.arguments("RUN") if "pip install" in run]
    assert '-c constraints.txt ".[server]"' in install
    assert " -e " not in install and "--editable" not in install
    # The runtime stage takes the venv alone, not the sources.
    copies = dockerfile.arguments("COPY")
    assert copies[-1] == "--from=build /opt/render-service /opt/render-service"


def test_the_runtime_user_is_not_root() -> None:
    assert dockerfile.uid() >= 1000
    assert dockerfile.last("USER") == f"{dockerfile.uid()}:{dockerfile.uid()}"  # numeric: runAsNonRoot can check it


def test_the_entrypoint_serves_every_address_on_the_exposed_ports() -> None:
    entrypoint = dockerfile.exec_form(dockerfile.last("ENTRYPOINT"))
    assert entrypoint[0] == "render-server"
    options = dict(zip(entrypoint[1::2], entrypoint[2::2], strict=True))
    assert options["--host"] == "0.0.0.0"
    assert options["--port"] == "50051"
    assert dockerfile.last("EXPOSE").split() == ["50051", "8080", "8081"]
    assert options["--health-port"] == "8081"
    # The HTTP port is passed exactly when render-server has the flag.
    if "--http-port" in server_help():
        assert options.get("--http-port") == "8080", "render-server has --http-port: switch the Dockerfile's ENTRYPOINT"
    else:
        assert "--http-port" not in options


def test_the_healthcheck_asks_the_health_port_for_readiness() -> None:
    healthcheck = dockerfile.last("HEALTHCHECK")
    command = dockerfile.exec_form(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert command == ["python", "-m", "render_server.probe", "--url", "http://127.0.0.1:8081/readyz"]


def test_no_test_machine_certificates_or_indexes_are_baked_in() -> None:
    text = dockerfile.DOCKERFILE.read_text(encoding="utf-8")
    for hack in (
        "ca-certificates",
        "update-ca-certificates",
        "PIP_CERT",
        "REQUESTS_CA_BUNDLE",
        "trusted-host",
        "index-url",
    ):
        assert hack not in text, hack


def test_the_build_context_leaves_environments_and_caches_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".git", ".venv", ".tools", "**/__pycache__", ".pytest_cache", ".ruff_cache", "**/*.egg-info"):
        assert entry in ignored, entry
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "client", "server"):
        assert needed not in ignored, needed
