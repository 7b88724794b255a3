"""The README's Python examples run as written against a live server.

They name the address `scripts/serve.sh` listens on; here it is replaced with the
test server's. Only the Kubernetes example (a cluster's DNS name) is not run.
"""

from __future__ import annotations

import re

import pytest

from tests.support import ROOT, ServerProcess

README_ADDRESS = '"127.0.0.1:50051"'


def readme_examples(heading: str) -> list[str]:
    """The Python code blocks of the README section under `heading`, up to the next heading."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines(keepends=True)
    start = lines.index(f"{heading}\n") + 1
    examples: list[str] = []
    block: list[str] | None = None  # the Python block being read
    fenced = False
    for line in lines[start:]:
        if line.startswith("```"):
            if not fenced and line.strip() == "```python":
                block = []
            elif fenced and block is not None:
                examples.append("".join(block))
                block = None
            fenced = not fenced
        elif fenced:
            if block is not None:
                block.append(line)
        elif re.match(r"#{1,3} ", line):  # a heading, not a comment inside a code block
            break
    return examples


def run_examples(examples: list[str], server: ServerProcess) -> None:
    namespace: dict[str, object] = {}
    assert README_ADDRESS in examples[0], "the examples call the server scripts/serve.sh starts"
    for example in examples:  # each goes on from the one before, as a reader's session would
        code = example.replace(README_ADDRESS, repr(server.target))
        exec(compile(code, "README.md", "exec"), namespace)


def test_the_quick_start_trainer_call_runs(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    examples = readme_examples("## Quick start")
    assert len(examples) == 1
    run_examples(examples, server)
    counts, multimodal = capsys.readouterr().out.strip().splitlines()
    tokens, trained = map(int, counts.split())
    assert 0 < trained < tokens
    assert multimodal == "None None"


def test_the_drop_in_renderer_examples_run(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    examples = readme_examples("### A drop-in `renderers.Renderer`")
    assert len(examples) == 2, "the SFT loader and the RL rollout examples"
    run_examples(examples, server)
    assert capsys.readouterr().out.strip() == "add {'a': 2, 'b': 2}"


def test_the_whole_dataset_example_runs(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    examples = readme_examples("### Whole datasets")
    assert len(examples) == 1
    run_examples(examples, server)
    lengths = capsys.readouterr().out.split()
    assert len(lengths) == 100 and all(int(length) > 0 for length in lengths)


def test_the_tokenizer_fingerprint_check_passes(server: ServerProcess) -> None:
    examples = readme_examples("### Checking that the server tokenizes as you do")
    assert len(examples) == 1
    run_examples(examples, server)  # it asserts that the fingerprints are equal


def test_every_python_example_is_run_here() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    run_here = sum(
        len(readme_examples(heading))
        for heading in (
            "## Quick start",
            "### A drop-in `renderers.Renderer`",
            "### Whole datasets",
            "### Checking that the server tokenizes as you do",
        )
    )
    in_cluster = len(readme_examples("### Pointing a trainer fleet at it"))
    assert in_cluster == 1
    assert len(re.findall(r"```python\n", text)) == run_here + in_cluster
