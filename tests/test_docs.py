"""The README's and docs/' examples run as written, in order, against a live server.

They name the addresses `scripts/serve.sh` listens on (127.0.0.1:50051 for gRPC,
127.0.0.1:8080 for HTTP); here those are replaced with the test server's. Every
code block of the README and docs/ is either run here or listed in NOT_RUN with
the reason, so an example added later cannot go untested unnoticed.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.manifests import BASE, manifests
from tests.support import ROOT, ServerProcess

GRPC_ADDRESS = "127.0.0.1:50051"
HTTP_ADDRESS = "127.0.0.1:8080"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: str  # relative to ROOT
    heading: str  # the nearest heading above it, with its #s
    language: str
    code: str


def blocks(page: Path) -> list[Block]:
    """Every fenced code block of `page`, with the heading it is under."""
    found: list[Block] = []
    heading, language, lines = "", None, []
    for line in page.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            if language is None:
                language, lines = line.strip()[3:], []
            else:
                found.append(Block(str(page.relative_to(ROOT)), heading, language, "".join(lines)))
                language = None
        elif language is not None:
            lines.append(line)
        elif re.match(r"#{1,6} ", line):
            heading = line.strip()
    return found


def examples(page: str, heading: str, language: str) -> list[str]:
    found = [b.code for b in blocks(ROOT / page) if b.heading == heading and b.language == language]
    assert found, f"no {language} example under {heading!r} in {page}"
    return found


def for_server(code: str, server: ServerProcess) -> str:
    return code.replace(GRPC_ADDRESS, server.target).replace(HTTP_ADDRESS, f"127.0.0.1:{server.http_port}")


def run_python(code: str, server: ServerProcess, page: str) -> None:
    """One example, in a namespace of its own: each must run on its own, as a reader copies it."""
    assert GRPC_ADDRESS in code, "the examples call the server scripts/serve.sh starts"
    exec(compile(for_server(code, server), page, "exec"), {})


def run_shell(code: str, server: ServerProcess, *, with_stderr: bool = False) -> str:
    """What the example prints on its standard output (and error, if asked), as a reader's terminal shows it."""
    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", for_server(code, server)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if with_stderr else subprocess.PIPE,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, f"exit {finished.returncode}:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout


# --- Python -----------------------------------------------------------------------------------

RUN_PYTHON = [
    ("README.md", "## Quick start"),
    ("README.md", "## Using it from a trainer"),
    ("docs/client.md", "## Checking that the server tokenizes as you do"),
    ("docs/client.md", "## Switching a trainer without editing it"),
]
# (page, heading, why it is not run here)
NOT_RUN = [
    ("docs/deploy.md", "## Pointing a trainer fleet at it", "python", "a cluster's DNS name"),
    (
        "docs/deploy.md",
        "## The container image",
        "sh",
        "docker: tests/deploy/test_container.py builds and serves the image",
    ),
    ("docs/deploy.md", "## Kubernetes", "sh", "kubectl: tests/deploy/test_manifests.py checks the manifests"),
    ("docs/development.md", "# Developing render-service", "sh", "scripts/test.sh: the run this is part of"),
    ("README.md", "## Quick start", "sh", "scripts/serve.sh and scripts/test.sh: this run and its server"),
    ("README.md", "## Running and deploying", "toml", "a registry naming a local directory"),
    (
        "docs/server.md",
        "## The model registry",
        "toml",
        "hub and local models; tests/server/test_config.py reads the forms",
    ),
    ("docs/server.md", "## The model registry", "", "a log line"),
]


def test_the_quick_start_trainer_call_runs(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    [example] = examples("README.md", "## Quick start", "python")
    run_python(example, server, "README.md")
    counts, multimodal = capsys.readouterr().out.strip().splitlines()
    tokens, trained = map(int, counts.split())
    assert 0 < trained < tokens
    assert multimodal == "None None"


def test_the_trainer_examples_run_each_on_its_own(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    sft, rollout, dataset = examples("README.md", "## Using it from a trainer", "python")
    run_python(sft, server, "README.md")  # it asserts that the sample ends with a stop token
    run_python(rollout, server, "README.md")
    assert capsys.readouterr().out.strip() == "add {'a': 2, 'b': 2}"
    run_python(dataset, server, "README.md")
    lengths = capsys.readouterr().out.split()
    assert len(lengths) == 100 and all(int(length) > 0 for length in lengths)


def test_the_tokenizer_fingerprint_check_passes(server: ServerProcess) -> None:
    [example] = examples("docs/client.md", "## Checking that the server tokenizes as you do", "python")
    run_python(example, server, "docs/client.md")  # it asserts that the fingerprints are equal


def test_the_switch_example_serves_renderers_own_create_renderer(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    import renderers

    original = renderers.create_renderer
    [example] = examples("docs/client.md", "## Switching a trainer without editing it", "python")
    run_python(example, server, "docs/client.md")
    assert capsys.readouterr().out.strip() == "Qwen3Renderer qwen3"
    assert renderers.create_renderer is original  # the example switched back


# --- the command line: docs/protocol.md, in order ----------------------------------------------

PROTOCOL = "docs/protocol.md"


def test_the_command_line_examples_run_in_order(server: ServerProcess) -> None:
    # The one command that builds the tools, where the page first uses them (a no-op once built).
    [setup] = examples(PROTOCOL, "# Calling render-service from anything else", "sh")
    assert setup.split()[:2] == ["scripts/setup.sh", "tools"]
    run_shell(setup, server)
    assert all((ROOT / ".tools" / "bin" / tool).is_file() for tool in ("grpcurl", "ghz", "grpc-health-probe"))

    [grpcurl] = examples(PROTOCOL, "## grpcurl", "sh")
    output = run_shell(grpcurl, server)
    assert "render.v1.RenderService" in output and "grpc.health.v1.Health" in output  # `list`
    answers = [json.loads(answer) for answer in re.findall(r"^\{\n.*?^\}\n", output, re.S | re.M)]
    models, sample = answers
    assert [model["id"] for model in models["models"]][:1] == ["qwen3"]
    tokens, mask = sample["sample"]["token_ids"], sample["sample"]["loss_mask"]
    assert len(tokens) == len(mask) > 0 and any(mask) and not all(mask)

    [curl] = examples(PROTOCOL, "## HTTP", "sh")
    rendered, refused = run_shell(curl, server).splitlines()
    assert json.loads(rendered)["sample"]["token_ids"][:2] == [151644, 872]  # as the comment beside it says
    body, status = refused.rsplit(" ", 2)[0], refused.rsplit(" ", 2)[1:]
    assert json.loads(body)["code"] == "NOT_FOUND" and status == ["HTTP", "404"]

    [ghz] = examples(PROTOCOL, "## Load testing with ghz", "sh")
    summary = run_shell(ghz, server)
    assert re.search(r"^\s+Count:\s+1000$", summary, re.M), summary
    assert "Error distribution" not in summary and re.search(r"\[OK\]\s+1000 responses", summary), summary

    [health] = examples(PROTOCOL, "## Health checks", "sh")
    # grpc-health-probe, render_server.probe, then curl's HTTP status.
    assert run_shell(health, server, with_stderr=True).split() == ["status:", "SERVING", "SERVING", "200"]


# --- docs/server.md's sizing: the memory the Kubernetes manifests set ------------------------------


def test_the_sizing_example_prints_the_manifests_memory() -> None:
    [sizing] = examples("docs/server.md", "## Sizing", "sh")
    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", sizing], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    memory = manifests(BASE).container["resources"]["limits"]["memory"]
    assert finished.stdout.splitlines()[-1].endswith(f"memory request = limit: {memory}"), finished.stdout
    # The example's flags are the manifest's own (the page says so).
    args = manifests(BASE).container["args"]
    for flag in sizing.split()[3:]:
        assert flag in args, flag


# --- nothing left out ---------------------------------------------------------------------------


def test_every_example_is_run_here_or_said_why_not() -> None:
    run_here = (
        {(page, heading, "python") for page, heading in RUN_PYTHON}
        | {
            (PROTOCOL, heading, "sh")
            for heading in (
                "# Calling render-service from anything else",
                "## grpcurl",
                "## HTTP",
                "## Load testing with ghz",
                "## Health checks",
            )
        }
        | {("docs/server.md", "## Sizing", "sh")}
    )
    not_run = {(page, heading, language) for page, heading, language, _ in NOT_RUN}
    left_out = [
        (block.page, block.heading, block.language)
        for page in PAGES
        for block in blocks(page)
        if (block.page, block.heading, block.language) not in run_here | not_run
    ]
    assert not left_out, f"examples neither run by tests/test_docs.py nor listed in NOT_RUN: {left_out}"
