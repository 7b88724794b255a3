from __future__ import annotations

import inspect
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from render_client import RenderClient
from tests.support import ServerProcess, running_server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One two-worker render-server on the default registry, shared by the whole session."""
    with running_server("--workers", "2") as process:
        yield process
    assert process.process.returncode == 0, process.log()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[RenderClient]:
    """A client with a connection per server worker."""
    with RenderClient(server.target, timeout=120, connections=2) as render_client:
        yield render_client


# --- the `server` marker: `pytest -m "not server"` is the quick loop ---
#
# A test is marked `server` when it, or a fixture it uses, starts a render-server
# process or builds a container image. Nobody writes the marker by hand: it is
# read off the code. The test function and every fixture in `item.fixturenames`
# (which holds the whole closure: `client` brings `server`, `stub` brings
# `limited`, ...) are walked, and each follows the functions, classes and
# modules of tests/ their code names, down to one of these:
#
# - a known starter: SERVER_STARTERS below;
# - code that launches a process (it names subprocess, Popen, ...) with
#   render_server in its command (a string constant "render_server",
#   "render-server", "render_server.cli", ...), as running_server itself and
#   test_workers' port-in-use test do; unless it only asks the command for its
#   --help or --version (test_dockerfile reads `render_server --help`: it serves nothing);
# - code that launches this repository's scripts/test.sh or scripts/setup.sh: a whole
#   checkout set up and tested (test_fresh_clone), minutes, not the quick loop's business.
#
# Reading the code, rather than converting every `with running_server(...)` in a
# test body into a fixture, finds both ways of starting one, and any new test or
# helper that starts one through them, with no list of tests to keep up to date.
# It errs on the side of marking: a name in a code object may be an attribute of
# something else that happens to share a starter's name; that only moves a test
# to the slower half.

TESTS = Path(__file__).resolve().parent
SERVER_STARTERS = {
    ("tests.support", "running_server"),  # render-server on loopback
    ("tests.deploy.container", "serving"),  # render-server inside the built image
    ("tests.deploy.container", "Buildah"),  # builds the image
    ("tests.deploy.container", "base_tarball"),  # debootstraps its base
}
PROCESS_LAUNCHERS = {"subprocess", "Popen", "create_subprocess_exec", "create_subprocess_shell", "spawnv", "execv"}
SERVER_COMMAND = re.compile(r"render[-_]server(\.\w+)*|scripts/(test|setup)\.sh")
NOT_SERVING = {"--help", "-h", "--version"}
_STARTS_SERVER: dict[types.CodeType, bool] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _item_starts_server(item):
            item.add_marker(pytest.mark.server)


def _item_starts_server(item: pytest.Item) -> bool:
    functions = [getattr(item, "obj", None)]
    fixture_info = getattr(item, "_fixtureinfo", None)
    definitions = fixture_info.name2fixturedefs if fixture_info is not None else {}
    for name in getattr(item, "fixturenames", ()):
        functions.extend(definition.func for definition in definitions.get(name, ()))
    return any(_starts_server(function) for function in functions if _ours(function))


def _starts_server(function: Any) -> bool:
    function = inspect.unwrap(getattr(function, "__func__", function))  # fixtures, contextmanagers, methods
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    if code not in _STARTS_SERVER:
        _STARTS_SERVER[code] = _reaches_a_starter(function, set())
    return _STARTS_SERVER[code]


def _reaches_a_starter(function: Any, seen: set[types.CodeType]) -> bool:
    function = inspect.unwrap(getattr(function, "__func__", function))
    code = getattr(function, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names, constants = _names_and_constants(code)
    if (
        names & PROCESS_LAUNCHERS
        and any(SERVER_COMMAND.fullmatch(constant) for constant in constants)
        and not constants & NOT_SERVING
    ):
        return True
    scope = getattr(function, "__globals__", {})
    for found in _resolved(names, scope):
        if _qualified(found) in SERVER_STARTERS:
            return True
        if not _ours(found):
            continue
        if isinstance(found, type):
            if any(_reaches_a_starter(member, seen) for member in _methods(found)):
                return True
        elif _reaches_a_starter(found, seen):
            return True
    return False


def _names_and_constants(code: types.CodeType) -> tuple[set[str], set[str]]:
    """The names (globals, attributes) and string constants of `code` and the code nested in it."""
    names, constants = set(code.co_names), set()
    for constant in code.co_consts:
        if isinstance(constant, str):
            constants.add(constant)
        elif isinstance(constant, (tuple, frozenset)):  # a list display of constants: ["cmd", "-m", ...]
            constants.update(item for item in constant if isinstance(item, str))
        elif isinstance(constant, types.CodeType):  # lambdas, comprehensions, inner functions
            inner_names, inner_constants = _names_and_constants(constant)
            names |= inner_names
            constants |= inner_constants
    return names, constants


def _resolved(names: set[str], scope: dict[str, Any]) -> Iterator[Any]:
    """What `names` are in `scope`; for a module of tests/ there, also its attributes among `names`
    (`support.running_server`)."""
    for name in names:
        found = scope.get(name)
        if found is None:
            continue
        yield found
        if isinstance(found, types.ModuleType) and _under_tests(getattr(found, "__file__", None)):
            yield from (getattr(found, attribute) for attribute in names if hasattr(found, attribute))


def _methods(cls: type) -> Iterator[Any]:
    for member in vars(cls).values():
        if isinstance(member, property):
            yield from (accessor for accessor in (member.fget, member.fset) if accessor is not None)
        else:
            yield getattr(member, "__func__", member)


def _qualified(found: Any) -> tuple[str, str]:
    found = inspect.unwrap(found) if callable(found) else found
    return getattr(found, "__module__", None) or "", getattr(found, "__qualname__", None) or ""


def _ours(found: Any) -> bool:
    """Whether `found` is a function or class defined under tests/ (not pytest's, nor a library's)."""
    if not (inspect.isfunction(found) or inspect.ismethod(found) or isinstance(found, type)):
        return False
    try:
        return _under_tests(inspect.getfile(inspect.unwrap(found)))
    except (TypeError, OSError):
        return False


def _under_tests(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(TESTS)
