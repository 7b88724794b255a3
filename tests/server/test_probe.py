"""render_server.probe: exit 0 exactly when the server is healthy, by the gRPC health service or a health URL."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT, free_port, running_server


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "render_server.probe", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def test_the_probe_passes_a_serving_server_and_fails_a_gone_one() -> None:
    health_port = free_port()
    with running_server("--workers", "1", "--health-port", str(health_port)) as server:
        by_grpc = probe("--address", server.target)
        by_url = probe("--url", f"http://127.0.0.1:{health_port}/readyz")
        missing = probe("--url", f"http://127.0.0.1:{health_port}/nonesuch")
    assert (by_grpc.returncode, by_grpc.stdout.strip()) == (0, "SERVING"), by_grpc.stderr
    assert by_url.returncode == 0 and by_url.stdout.startswith("ready: 1 workers serving"), by_url.stderr
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    gone = probe("--url", f"http://127.0.0.1:{health_port}/readyz", "--timeout", "2")
    assert gone.returncode == 1 and gone.stderr.startswith("unhealthy: "), gone.stderr
    assert probe("--address", server.target, "--timeout", "2").returncode == 1
