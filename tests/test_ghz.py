"""A short ghz load run (text and image requests from the corpus) finishes without a single error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.ghz_data import requests_for
from tests.support import ServerProcess, corpus, tool


def test_ghz_run_has_no_errors(server: ServerProcess, tmp_path: Path) -> None:
    requests = requests_for(["qwen3", "qwen3-vl", "deepseek-v4"], list(corpus()))
    with_images = [
        r
        for r in requests
        if any("image" in part for m in r["messages"] for part in m.get("parts", {}).get("parts", []))
    ]
    assert len(with_images) >= 30 and len(requests) - len(with_images) >= 300
    data = tmp_path / "requests.json"
    data.write_text(json.dumps(requests))
    command = [tool("ghz"), "--insecure", "--call", "render.v1.RenderService.RenderTrainingSample"]
    command += ["--data-file", str(data), "--disable-template-data", "--max-recv-message-size", "1GB"]
    command += ["--total", "2000", "--concurrency", "16", "--connections", "2", "--format", "json", server.target]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["count"] == 2000
    assert report["statusCodeDistribution"] == {"OK": 2000}, report.get("errorDistribution")
    assert not report.get("errorDistribution")
