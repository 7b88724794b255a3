"""Build and run the repository's Dockerfile with no Docker engine: debootstrap, buildah and a chroot.

- The base image: Debian bookworm made by debootstrap with python3 and
  python3-venv (what the Dockerfile needs of BASE_IMAGE), plus this machine's
  extra CA certificates so that pip inside the build reaches PyPI through this
  machine's network. A test-side step: the Dockerfile carries none of it.
  Cached as a tarball (tests/deploy/cache.py), made again when its recipe or
  the certificates change.
- buildah, with storage of its own in a scratch folder (removed afterwards),
  imports that rootfs as an image and builds the Dockerfile on it with
  `--build-arg BASE_IMAGE=<it> --isolation chroot`.
- The image runs from `buildah mount`: a command of it in a chroot, as the
  image's user, in a mount namespace of its own holding /proc, a minimal /dev
  and the volumes a test gives (as a container runtime would, without the
  namespaces and cgroups that `podman run` cannot set up here). The network is
  this machine's: a server inside listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy.cache import cache_dir, locked

log = logging.getLogger("tests.deploy")

SUITE = "bookworm"
MIRROR = os.environ.get("RENDER_SERVICE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CERTIFICATES = Path("/usr/local/share/ca-certificates")
RECIPE = 1  # bump when base_tarball() changes, to remake cached bases
# vfs works on any file system (also inside a container); overlay is faster where the kernel allows it.
STORAGE_DRIVER = os.environ.get("RENDER_SERVICE_STORAGE_DRIVER", "vfs")
TOOLS = ("buildah", "debootstrap", "unshare", "chroot", "mount", "mknod", "tar")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    search = os.environ.get("PATH", "") + ":" + SYSTEM_PATH
    return [name for name in TOOLS if shutil.which(name, path=search) is None]


def run(command: Sequence[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a command to its end; its stdout, or CommandError with the end of its output."""
    log.debug("$ %s", shlex.join(command))
    environment = {**os.environ, "PATH": os.environ.get("PATH", "") + ":" + SYSTEM_PATH, **(env or {})}
    answered = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, env=environment, stdin=subprocess.DEVNULL
    )
    if answered.returncode != 0:
        tail = "\n".join((answered.stdout + answered.stderr).splitlines()[-80:])
        raise CommandError(f"exit {answered.returncode}: {shlex.join(command)}\n{tail}")
    return answered.stdout


# --- the base image ---


def base_tarball() -> Path:
    """A Debian rootfs with python3 and venv, as a tarball in the cache: made by debootstrap if missing."""
    certificates = sorted(HOST_CERTIFICATES.glob("*.crt")) if HOST_CERTIFICATES.is_dir() else []
    digest = hashlib.sha256(json.dumps([RECIPE, SUITE, MIRROR, BASE_PACKAGES]).encode())
    for certificate in certificates:
        digest.update(certificate.name.encode() + b"\0" + certificate.read_bytes())
    stem = f"base-{SUITE}-python3-"
    tarball = cache_dir() / f"{stem}{digest.hexdigest()[:16]}.tar"
    with locked("base"):
        if tarball.exists():
            log.info("base rootfs from the cache: %s", tarball)
            return tarball
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="debootstrap-") as scratch:
            rootfs = Path(scratch) / "rootfs"
            # In a mount namespace of its own: what debootstrap mounts (/proc, /sys) goes when it ends, even on failure.
            run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    MIRROR,
                ],
                timeout=1500,
            )
            # This machine reaches PyPI through its network: trust what it trusts.
            trusted = rootfs / "usr/local/share/ca-certificates"
            trusted.mkdir(parents=True, exist_ok=True)
            for certificate in certificates:
                shutil.copyfile(certificate, trusted / certificate.name)
            run(["chroot", str(rootfs), "update-ca-certificates", "--fresh"], timeout=120, env={"PATH": SYSTEM_PATH})
            # What debootstrap copied from this machine or kept: not part of an image.
            for leftover in ("etc/resolv.conf", "etc/hostname"):
                (rootfs / leftover).unlink(missing_ok=True)
            for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / folder).glob("*"):
                    if path.is_file():
                        path.unlink()
            partial = tarball.with_suffix(".partial")
            excluded = ["--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*"]
            run(["tar", "--numeric-owner", *excluded, "-C", str(rootfs), "-cf", str(partial), "."], timeout=600)
            partial.replace(tarball)
        for stale in cache_dir().glob(f"{stem}*"):
            if stale != tarball:
                stale.unlink()
    return tarball


# --- buildah ---


@dataclass
class ImageConfig:
    """What a container runtime reads from an image to run it."""

    entrypoint: list[str]
    cmd: list[str]
    user: str
    env: dict[str, str]
    workdir: str
    exposed_ports: set[str]
    healthcheck: list[str]

    @classmethod
    def of(cls, inspected: dict[str, Any]) -> ImageConfig:
        config = inspected["Docker"]["config"]
        return cls(
            entrypoint=list(config.get("Entrypoint") or []),
            cmd=list(config.get("Cmd") or []),
            user=config.get("User") or "0",
            env=dict(item.split("=", 1) for item in config.get("Env") or []),
            workdir=config.get("WorkingDir") or "/",
            exposed_ports=set(config.get("ExposedPorts") or {}),
            healthcheck=list((config.get("Healthcheck") or {}).get("Test") or []),
        )


class Buildah:
    """buildah on a storage of its own, in a scratch folder that destroy() removes."""

    def __init__(self) -> None:
        _remove_abandoned_storage()
        self.storage = cache_dir() / f"buildah-{os.getpid()}"
        self.storage.mkdir()
        self.prefix = ["buildah", "--root", str(self.storage / "root"), "--runroot", str(self.storage / "run")]
        self.prefix += ["--storage-driver", STORAGE_DRIVER]

    def __call__(self, *args: str, timeout: float = 600) -> str:
        return run([*self.prefix, *args], timeout=timeout).strip()

    def import_rootfs(self, tarball: Path, name: str) -> None:
        container = self("from", "scratch")
        try:
            mounted = self("mount", container)
            run(["tar", "--numeric-owner", "-xpf", str(tarball), "-C", mounted], timeout=600)
            self("config", "--env", f"PATH={SYSTEM_PATH}", "--env", "LANG=C.UTF-8", "--cmd", "/bin/bash", container)
            self("commit", "--quiet", container, name, timeout=900)
        finally:
            self("rm", container)

    def build(self, context: Path, tag: str, build_args: dict[str, str]) -> str:
        arguments = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        return self(
            "bud",
            "--isolation",
            "chroot",
            "--format",
            "docker",  # the OCI format has no HEALTHCHECK
            "--pull=never",  # the option's value must be attached
            *arguments,
            "--tag",
            tag,
            "--file",
            str(context / "Dockerfile"),
            str(context),
            timeout=1800,
        )

    def config(self, image: str) -> ImageConfig:
        return ImageConfig.of(json.loads(self("inspect", "--type", "image", image)))

    def mount_new_container(self, image: str) -> Path:
        container = self("from", "--pull=never", image)
        return Path(self("mount", container))

    def destroy(self) -> None:
        for args in (("umount", "--all"), ("rm", "--all"), ("rmi", "--all", "--force")):
            try:
                self(*args)
            except (CommandError, subprocess.TimeoutExpired) as exc:
                log.warning("buildah %s: %s", " ".join(args), exc)
        _remove_storage(self.storage)


def _remove_abandoned_storage() -> None:
    """Storage a killed run left behind (its pid is gone)."""
    for folder in cache_dir().glob("buildah-*"):
        pid = folder.name.removeprefix("buildah-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            log.info("removing abandoned buildah storage %s", folder)
            _remove_storage(folder)


def _remove_storage(folder: Path) -> None:
    for mount_point in sorted(_mounts_under(folder), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount_point], check=False, capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        points = [line.split()[4].encode().decode("unicode_escape") for line in mountinfo]
    return [point for point in points if point.startswith(prefix)]


# --- running a command of the image ---


@dataclass(frozen=True)
class Volume:
    """A mount inside the container: a host directory bound, or an empty tmpfs (an emptyDir)."""

    target: str
    source: Path | None = None
    read_only: bool = False


@dataclass
class Sandbox:
    """How to run commands of a mounted image: its rootfs, user, environment, working folder, volumes."""

    rootfs: Path
    uid: int
    gid: int
    env: dict[str, str]
    workdir: str = "/"
    volumes: list[Volume] = field(default_factory=list)
    read_only_root: bool = False

    @classmethod
    def of(cls, rootfs: Path, config: ImageConfig, **overrides: Any) -> Sandbox:
        uid, gid = image_user(rootfs, config.user)
        env = {"HOME": home(rootfs, uid), **config.env}
        return cls(rootfs=rootfs, uid=uid, gid=gid, env=env, workdir=config.workdir, **overrides)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs `argv` inside the image; its pid is that of `argv` once it runs."""
        root = shlex.quote(str(self.rootfs))
        lines = ["set -eu"]
        for volume in self.volumes:
            lines.append(f"mkdir -p {root}{shlex.quote(volume.target)}")
        if self.read_only_root:
            lines += [f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}"]
        lines += [
            f"mount -t proc -o nosuid,nodev,noexec proc {root}/proc",
            f"mount -t tmpfs -o nosuid,mode=0755,size=64k tmpfs {root}/dev",
            *(f"mknod -m 0666 {root}/dev/{name} c 1 {minor}" for name, minor in _DEVICES),
            f"ln -s /proc/self/fd {root}/dev/fd",
            *(f"ln -s /proc/self/fd/{fd} {root}/dev/{name}" for fd, name in enumerate(("stdin", "stdout", "stderr"))),
            f"mkdir {root}/dev/shm",
            f"mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {root}/dev/shm",
        ]
        for volume in self.volumes:
            target = root + shlex.quote(volume.target)
            if volume.source is None:
                lines.append(f"mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {target}")
            else:
                lines.append(f"mount --bind {shlex.quote(str(volume.source))} {target}")
                if volume.read_only:
                    lines.append(f"mount -o remount,bind,ro {target}")
        environment = [f"{name}={value}" for name, value in self.env.items()]
        inside = ["/usr/bin/env", "-i", "-C", self.workdir, *environment, *argv]
        lines.append(f"exec chroot --userspec={self.uid}:{self.gid} --groups={self.gid} {root} {shlex.join(inside)}")
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)]

    def run(self, argv: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )


_DEVICES = (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9))


def image_user(rootfs: Path, user: str) -> tuple[int, int]:
    """USER ("10001:10001", "render", "render:render") as numbers, from the image's own passwd and group."""
    name, _, group = user.partition(":")
    passwd = _table(rootfs / "etc/passwd")
    uid = int(name) if name.isdigit() else int(passwd[name][1])
    if group:
        gid = int(group) if group.isdigit() else int(_table(rootfs / "etc/group")[group][1])
    else:
        gid = next((int(row[2]) for row in passwd.values() if int(row[1]) == uid), 0)
    return uid, gid


def home(rootfs: Path, uid: int) -> str:
    return next((row[4] for row in _table(rootfs / "etc/passwd").values() if int(row[1]) == uid), "/")


def _table(path: Path) -> dict[str, list[str]]:
    rows = [line.split(":") for line in path.read_text(encoding="utf-8").splitlines() if line and ":" in line]
    return {row[0]: row[1:] for row in rows}


_READY = re.compile(r"render-server listening on (\S+):(\d+)(?: http (\S+):(\d+))?")


@dataclass
class Server:
    """render-server running inside the image."""

    process: subprocess.Popen[str]
    port: int
    http_port: int | None
    output: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.output)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as a container runtime stops a container; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.output.append(f"[test] no exit {timeout}s after SIGTERM: killed\n")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of it still left
        self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def serving(sandbox: Sandbox, argv: Sequence[str], timeout: float = 300) -> Iterator[Server]:
    """Start `argv` (render-server) in the sandbox, wait for its ready line, stop it after."""
    process = subprocess.Popen(
        sandbox.command(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    ready = threading.Event()
    found: list[re.Match[str]] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = _READY.search(line)
            if match and not found:
                found.append(match)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    server = Server(process=process, port=0, http_port=None, output=output)
    try:
        if not ready.wait(timeout) or not found:
            raise RuntimeError(f"render-server did not start in the image:\n{''.join(output)}")
        match = found[0]
        server.port = int(match.group(2))
        server.http_port = int(match.group(4)) if match.group(4) else None
        yield server
    finally:
        server.stop()
