"""The repository's Dockerfile, read as instructions (for checks that need no build)."""

from __future__ import annotations

import json
import re
import shlex

from tests.support import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comment lines dropped."""
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def arguments(keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, in order."""
    return [rest for name, rest in instructions() if name == keyword]


def last(keyword: str) -> str:
    """The arguments of the last `keyword` instruction: the runtime stage's."""
    return arguments(keyword)[-1]


def exec_form(text: str) -> list[str]:
    """["a", "b"] (exec form) or a b (shell form) as a list of words."""
    return json.loads(text) if text.startswith("[") else shlex.split(text)


def uid() -> int:
    return int(last("USER").split(":")[0])


def env(name: str) -> str:
    """The value the runtime stage's ENV gives `name`."""
    for keyword, rest in reversed(instructions()):
        if keyword == "ENV":
            match = re.search(rf"(?:^|\s){name}=(\S+)", rest)
            if match:
                return match.group(1)
    raise KeyError(name)
