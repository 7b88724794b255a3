"""The README's Python examples for the drop-in renderer run as written against a live server."""

from __future__ import annotations

import re

import pytest

from tests.support import ROOT, ServerProcess

SECTION = "### A drop-in `renderers.Renderer`"


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n### ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_drop_in_renderer_examples_run(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    examples = readme_examples()
    assert len(examples) == 2, "the SFT loader and the RL rollout examples"
    namespace: dict[str, object] = {}
    for example in examples:  # the second goes on from the first, as a reader's session would
        code = example.replace('"render-service:50051"', repr(server.target))
        exec(compile(code, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "add {'a': 2, 'b': 2}"
