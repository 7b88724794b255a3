"""A RenderClient in an SFT data loader: made in the parent, used by worker processes.

The shape of a real loader: the trainer makes the client and renderer in the
parent process and uses them there, then hands a dataset holding the renderer
to worker processes (inherited under "fork", pickled under "spawn" and
"forkserver", as torch's DataLoader does). Each worker builds samples with
renderers' own build_training_sample on the remote renderer, several at once,
shifts them into inputs and targets, and sends them back to the parent, which
compares them with in-process rendering. gRPC channels are not to be used
across a fork: each worker must call through a connection it opened itself,
and the pool's timeout turns a worker stuck on a broken channel into a failure
rather than a hung test run.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import renderers

from render_client import RenderClient, RenderError, tls_credentials
from render_client.renderer import RemoteRenderer
from tests.reference import reference_renderer, sample_differences
from tests.support import ServerProcess, corpus

MODEL = "qwen3-vl"  # images too: mm_token_type_ids and pixel tensors cross both process boundaries
WORKERS = 3
BATCH = 3
POOL_TIMEOUT = 90.0  # seconds for the whole pool: a worker stuck on its parent's channel fails the test
START_METHODS = [
    method for method in ("fork", "spawn", "forkserver") if method in multiprocessing.get_all_start_methods()
]


def trainable(message: dict[str, Any]) -> bool:
    """role_to_mask: a module-level function, so that it pickles."""
    return message["role"] == "assistant"


@dataclass
class SftDataset:
    """What a trainer hands its DataLoader: conversations and the renderer; items are shifted for next-token loss."""

    renderer: RemoteRenderer
    conversations: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        sample = renderers.build_training_sample(
            self.renderer, conversation["messages"], role_to_mask=trainable, tools=conversation.get("tools")
        )
        ids, mask = sample.token_ids, sample.loss_mask
        item = {
            "id": conversation["id"],
            "sample": sample,
            "input_ids": ids[:-1],
            "labels": ids[1:],
            "loss_mask": mask[1:],
            "mm_token_type_ids": None if sample.mm_token_type_ids is None else sample.mm_token_type_ids[:-1],
        }
        # The model learns to stop: a stop token is among the trained targets.
        stop_ids = set(self.renderer.get_stop_token_ids())
        assert any(label in stop_ids for label, on in zip(item["labels"], item["loss_mask"], strict=True) if on)
        return item


def loader_conversations() -> list[dict[str, Any]]:
    """Six conversations with images, six with tool calls, six of plain text, that the model renders in-process."""
    local = reference_renderer(MODEL)
    groups: dict[str, list[dict[str, Any]]] = {"images": [], "tool_calls": [], "text": []}
    for conversation in corpus():
        tags = conversation["tags"]
        group = groups["images" if "images" in tags else "tool_calls" if "tool_calls" in tags else "text"]
        if len(group) < 6:
            try:
                local.render_ids(conversation["messages"], tools=conversation.get("tools"))
            except Exception:
                continue
            group.append(conversation)
    return [conversation for group in groups.values() for conversation in group]


# -- the worker processes' side ------------------------------------------------------

_dataset: SftDataset | None = None


def _start_worker(dataset: SftDataset, ready: Any) -> None:
    global _dataset
    _dataset = dataset
    ready.wait(timeout=POOL_TIMEOUT)  # every worker up before any takes a batch: all three render


def _load_batch(indices: list[int]) -> tuple[int, int, list[dict[str, Any]]]:
    """One batch, its samples rendered at once (threads opening this process's connection together);
    with this process's id and that of the process whose connection the client called through."""
    assert _dataset is not None
    with ThreadPoolExecutor(len(indices)) as threads:
        items = list(threads.map(_dataset.__getitem__, indices))
    connection = _dataset.renderer.client._process_connection
    return os.getpid(), connection.pid if connection else 0, items


# -- the parent's ----------------------------------------------------------------------


@contextmanager
def parent_traffic(renderer: RemoteRenderer) -> Iterator[list[int]]:
    """Calls through `renderer` in a loop on a thread until the block ends; yields [calls made]."""
    calls = [0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                renderer.render_ids([{"role": "user", "content": "Still training."}])
                calls[0] += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield calls
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors and not thread.is_alive(), errors


@pytest.mark.parametrize("start_method", START_METHODS)
def test_data_loader_workers_render_with_the_parents_client(server: ServerProcess, start_method: str) -> None:
    conversations = loader_conversations()
    assert len(conversations) == 18
    local = reference_renderer(MODEL)
    expected = [
        renderers.build_training_sample(local, c["messages"], role_to_mask=trainable, tools=c.get("tools"))
        for c in conversations
    ]
    with RenderClient(server.target, timeout=30, connections=2) as client:
        dataset = SftDataset(client.renderer(MODEL), conversations)
        # The parent uses its client first: its channel is open when the workers start.
        assert not sample_differences(expected[0], dataset[0]["sample"])
        context = multiprocessing.get_context(start_method)
        batches = [list(range(start, start + BATCH)) for start in range(0, len(dataset), BATCH)]
        # The workers start while no call is in flight (gRPC's fork handlers skip a fork() made
        # while another thread is inside gRPC, and the child's gRPC is then unusable, a fresh
        # channel or not); then the trainer keeps calling through its client while they work.
        with (
            context.Pool(WORKERS, initializer=_start_worker, initargs=(dataset, context.Barrier(WORKERS))) as pool,
            parent_traffic(dataset.renderer) as parent_calls,
        ):
            pending = pool.map_async(_load_batch, batches, chunksize=1)
            try:
                loaded = pending.get(timeout=POOL_TIMEOUT)
            except multiprocessing.TimeoutError:
                pytest.fail(f"the {start_method} workers did not finish in {POOL_TIMEOUT:g} s: a hung connection")
        assert parent_calls[0] > 0
        # The parent's connection still works after its children opened theirs.
        assert not sample_differences(expected[-1], dataset[len(dataset) - 1]["sample"])

    pids = {pid for pid, _, _ in loaded}
    assert os.getpid() not in pids and len(pids) >= 2, pids
    # Each worker called through a connection of its own. (A channel inherited through fork()
    # happens to work in grpcio's default fork support while nothing was in flight at the fork;
    # the client must not count on it.)
    assert all(connection_pid == pid for pid, connection_pid, _ in loaded), [row[:2] for row in loaded]
    items = [item for _, _, batch in loaded for item in batch]
    assert [item["id"] for item in items] == [c["id"] for c in conversations]
    with_media = 0
    for item, want in zip(items, expected, strict=True):
        assert type(item["sample"]) is renderers.RenderedTrainingSample
        assert not sample_differences(want, item["sample"]), item["id"]
        assert item["input_ids"] == want.token_ids[:-1] and item["labels"] == want.token_ids[1:], item["id"]
        assert item["loss_mask"] == want.loss_mask[1:], item["id"]
        if want.mm_token_type_ids is None:
            assert item["mm_token_type_ids"] is None, item["id"]
        else:
            with_media += 1
            assert item["mm_token_type_ids"] == want.mm_token_type_ids[:-1] and 1 in item["mm_token_type_ids"]
    assert with_media >= 6


# -- pickling ------------------------------------------------------------------------------


def test_a_pickled_client_and_renderer_render(server: ServerProcess) -> None:
    conversation = next(c for c in corpus() if "tool_calls" in c["tags"])
    messages, tools = conversation["messages"], conversation.get("tools")
    expected = reference_renderer("qwen3").render(messages, tools=tools)
    with RenderClient(server.target, timeout=60) as client:
        remote = client.renderer("qwen3")
        assert remote.render(messages, tools=tools) == expected  # the channel is open
        copy = pickle.loads(pickle.dumps(client))
        assert type(copy) is RenderClient and copy is not client
        with copy:
            assert copy.renderer("qwen3").render(messages, tools=tools) == expected
        renderer_copy = pickle.loads(pickle.dumps(remote))
        assert type(renderer_copy) is type(remote) and renderer_copy.model == "qwen3"
        assert renderer_copy.client is not client
        assert renderer_copy.render(messages, tools=tools) == expected
        assert renderer_copy.get_stop_token_ids() == remote.get_stop_token_ids()
        # the original is unaffected
        assert remote.render_ids(messages, tools=tools) == expected.token_ids


def self_signed(folder: Path) -> tuple[Path, Path]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=folder, check=True, capture_output=True,
    )  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


def test_a_client_with_tls_credentials_pickles(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    for credentials in (tls_credentials(), tls_credentials(ca=cert), tls_credentials(ca=cert, cert=cert, key=key)):
        assert isinstance(credentials, grpc.ChannelCredentials)
        again = pickle.loads(pickle.dumps(credentials))
        assert isinstance(again, grpc.ChannelCredentials) and again is not credentials
        client = RenderClient("127.0.0.1:1", timeout=5, credentials=credentials)
        copy = pickle.loads(pickle.dumps(client))
        # The copy opens a TLS channel with them (nothing listens there: the call fails, but not on the credentials).
        with copy, pytest.raises(RenderError) as failure:
            copy.list_models(timeout=0.5)
        assert failure.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert type(pickle.loads(pickle.dumps(RemoteRenderer(client, "qwen3")))) is RemoteRenderer


@pytest.mark.parametrize(
    "make_credentials",
    [
        grpc.ssl_channel_credentials,
        grpc.local_channel_credentials,
        lambda: grpc.composite_channel_credentials(tls_credentials(), grpc.access_token_call_credentials("token")),
    ],
    ids=["ssl_channel_credentials", "local_channel_credentials", "composite"],
)
def test_a_client_with_other_credentials_refuses_to_pickle(make_credentials: Any) -> None:
    client = RenderClient("127.0.0.1:1", credentials=make_credentials())
    with pytest.raises(TypeError, match=r"render_client\.tls_credentials"):
        pickle.dumps(client)
    with pytest.raises(TypeError, match=r"render_client\.tls_credentials"):
        pickle.dumps(RemoteRenderer(client, "qwen3"))
