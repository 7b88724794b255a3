"""renderers' own test suite, run against the remote renderer.

The pinned renderers version's sdist comes from the package index (cached
outside the repo, tests/renderers_suite); its build-helper, sampled-mask,
is-content, message-index, tokens-per-message, preserve-thinking,
parse-response, DeepSeek-V4 and bridge tests run twice, in subprocesses, with
the renderers_shim plugin mapping hub models of the Qwen3 and DeepSeek-V4
families to the packaged tokenizers: in process (the baseline), then with the
renderers the server serves standing in for create_renderer's. Every test that
passes in process on a served config must pass remotely.

`python -m tests.renderers_suite` does the same outside pytest and prints the counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.renderers_suite import Comparison, compare
from tests.renderers_suite.renderers_shim import IN_PROCESS_ONLY
from tests.support import running_server

# Floors, so that the comparison cannot pass by running nothing: with renderers
# 0.1.12, 389 tests pass in process, 377 of them on served configs (278 on the
# default registry's); none is IN_PROCESS_ONLY (the mechanism stays for a later
# renderers version's tests of what only an in-process renderer has).
MIN_SERVED_PASSING = 360
MIN_DEFAULT_SERVED_PASSING = 260


@contextmanager
def _server(registry: Path) -> Iterator[str]:
    with running_server("--config", str(registry), "--workers", "1", "--no-http") as server:
        yield server.target
    assert server.process.returncode == 0, server.log()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    result = compare(tmp_path_factory.mktemp("renderers-suite"), _server)
    print(result.summary())
    return result


def test_every_in_process_pass_on_a_served_config_passes_remotely(comparison: Comparison) -> None:
    regressions = comparison.regressions()
    assert not regressions, "passing in process, not against the server:\n" + "\n".join(
        f"{test}: {problem}" for test, problem in regressions.items()
    )


def test_served_tests_ran_remotely(comparison: Comparison) -> None:
    # A test on served configs in the baseline that used a renderer in process
    # remotely, or never called the server, would pass without being remote.
    assert comparison.misclassified() == []


def test_the_comparison_covers_the_suite(comparison: Comparison) -> None:
    assert len(comparison.served_passing) >= MIN_SERVED_PASSING, comparison.summary()
    assert len(comparison.default_served_passing) >= MIN_DEFAULT_SERVED_PASSING, comparison.summary()
    suites = {test.split("::")[0].rsplit("/", 1)[-1] for test in comparison.remote_passing}
    assert {"test_deepseek_v4.py", "test_bridge.py", "test_parse_response.py", "test_build_helpers.py"} <= suites


def test_in_process_only_exceptions_are_current(comparison: Comparison) -> None:
    """Each test IN_PROCESS_ONLY sets apart still exists and passes in process on served configs."""
    assert comparison.baseline["in_process_only_collected"] == sorted(IN_PROCESS_ONLY)
    for name in IN_PROCESS_ONLY:
        file, function = name.split("::")
        cases = [
            entry
            for test, entry in comparison.baseline["tests"].items()
            if test.split("[")[0] == f"tests/{file}::{function}"
        ]
        assert cases and all(entry["outcome"] == "passed" and entry["served"] for entry in cases), name
