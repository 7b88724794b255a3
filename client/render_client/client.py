"""The blocking client, and the drop-in `build_training_sample`.

from render_client import RenderClient, build_training_sample

client = RenderClient("render-service:50051")
renderer = client.renderer("qwen3")          # instead of renderers.create_renderer(...)
sample = build_training_sample(renderer, messages, role_to_mask=lambda m: m["role"] == "assistant")

# A whole dataset, in order, with a bounded number in flight:
requests = (renderer.request(row["messages"], tools=row.get("tools")) for row in dataset)
for sample in client.render_many(requests, concurrency=32):
    ...
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from render_wire.compact import materialize_all
from render_wire.errors import DeadlineExceededError, RenderError, error_from_rpc
from render_wire.identity import decode_identity
from render_wire.jsonvalue import dump_json
from render_wire.models import decode_models, decode_renderer_info
from render_wire.pb import render_pb2 as pb
from render_wire.requests import (
    encode_bridge_request,
    encode_describe_request,
    encode_parse_request,
    encode_render_request,
    encode_sample_request,
    request_images,
    with_held_mm_hashes,
)
from render_wire.samples import decode_parsed_response, decode_response, decode_tokens_response
from render_wire.types import (
    ModelInfo,
    RenderedTrainingSample,
    RendererInfo,
    SampleRequest,
    ServerModels,
    TokensRequest,
)

from .channel import ChannelOptions, Connection, ConnectionSettings, deadline_for, remaining
from .coalescing import (
    COALESCED,
    DEADLINE_DETAILS,
    DEFAULT_WINDOW,
    Coalescer,
    answer_of,
    serialized,
)
from .consistency import Pins
from .images import DEFAULT_IMAGE_MEMORY_MB, Claim, ImageStore, MiB, MissingHeldItem, StreamImages
from .renderer import RemoteRenderer, remote_renderer
from .streaming import SAMPLES, TOKENS, ItemT, RequestT, ResultT, StreamMethod
from .sync_streams import render_many

Message = Mapping[str, Any]
T = TypeVar("T")


class RenderClient:
    """A connection to render-service. Thread-safe; share one per process.

    Safe to create before forking (DataLoader workers with the fork start
    method) and to pickle (spawn, forkserver): each process opens its own
    connections on first use, since gRPC channels do not survive a fork.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        connections: int = 1,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
        compact_tensors: bool = False,
        coalesce_window: float | None = DEFAULT_WINDOW,
        image_memory_mb: float = DEFAULT_IMAGE_MEMORY_MB,
    ) -> None:
        """Connect to `target`: a gRPC target ("host:port", "dns:///name:port"), or a list
        of "ip:port" addresses to spread calls over (round_robin).

        `timeout` is the default deadline of a unary call, in seconds.
        `connections` opens that many HTTP/2 connections and spreads calls over
        them: a server's worker processes each take whole connections, which the
        kernel assigns at random, so a client that alone should keep a server busy
        wants several per server core (4 x workers spreads well).
        `token` is sent as `authorization: Bearer <token>` on every call;
        `credentials` (e.g. `channel.tls_credentials(...)`) turns on TLS.
        Calls that fail UNAVAILABLE are retried with backoff (channel.py).
        Pixel tensors arrive in an exact compact form, 1/8 of their bytes, and are
        rebuilt into the same arrays; with `compact_tensors` they are left as
        `render_client.CompactTensor`s (codes and tables; `.materialize()` gives the
        array) for trainers that expand them on their own device.
        Calls that threads make at once (render, render_tokens, parse_response,
        bridge_to_next_turn) travel together in batches: a call waits at most
        `coalesce_window` seconds for others to join it (coalescing.py); None sends
        each call on its own.
        The pixel tensors of images the client was answered are held, up to
        `image_memory_mb` MiB per process (least recently used dropped first), and
        do not travel again: a later answer for the same image (a GRPO group's
        rollouts, every turn of a VLM rollout) hands back the very arrays held
        (images.py); 0 holds none.
        """
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        if coalesce_window is not None and not coalesce_window >= 0:
            raise ValueError(f"coalesce_window must be a number of seconds, at least 0, or None; got {coalesce_window}")
        if not image_memory_mb >= 0:
            raise ValueError(f"image_memory_mb must be at least 0, got {image_memory_mb}")
        self._settings = ConnectionSettings(target, connections, token, credentials, tuple(options))
        self._timeout = timeout
        self._compact_tensors = compact_tensors
        self._coalesce_window = coalesce_window
        self._image_memory = int(image_memory_mb * MiB)
        self._process_connection: _ProcessConnection | None = None
        self._closed = False
        # What the server declares, kept across forks and pickling: it does not change.
        self._models: ServerModels | None = None
        self._renderer_infos: dict[tuple[str, str], RendererInfo] = {}
        # Each model's fingerprint as the first replica to answer declared it: kept across forks and pickling.
        self._pins = Pins()

    @property
    def _connection(self) -> Connection:
        """This process's connection, opened on first use."""
        return self._in_this_process.connection

    @property
    def _in_this_process(self) -> _ProcessConnection:
        """This process's connection and what goes with it, opened on first use."""
        current = self._process_connection
        pid = os.getpid()
        if current is not None and current.pid == pid:
            return current
        with _connect_lock:
            current = self._process_connection
            if current is None or current.pid != pid:  # first use, or a child of the process that opened it
                connection = self._settings.connect(asyncio=False)
                connection.closed = self._closed
                window = self._coalesce_window
                coalescer = None if window is None else Coalescer(connection, window)
                images = ImageStore(self._image_memory, threading.Event)
                current = self._process_connection = _ProcessConnection(pid, connection, coalescer, images)
        return current

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_process_connection"] = None  # channels do not cross processes
        return state

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer:
        """The server's renderer for `model`, standing in for `renderers.create_renderer(...)`.

        It is a `renderers.Renderer` (a `renderers.MultimodalRenderer` for models
        that take images), an instance of the renderers class the server's renderer
        is, with its `config` and public attributes (renderer.py): pass it to
        renderers' own helpers or to this package's `build_training_sample`.
        `chat_template_kwargs` plays the part it plays in `renderers.create_renderer`,
        and kwargs the renderer refuses raise here, as there. Asks the server what
        it has once per client (and model and kwargs).
        """
        kwargs = dict(chat_template_kwargs) if chat_template_kwargs else None
        return remote_renderer(self, model, kwargs, self.renderer_info(model, kwargs))

    def _model_info(self, model: str) -> ModelInfo:
        return self._server_models().info(model)

    def renderer_info(self, model: str, chat_template_kwargs: Mapping[str, Any] | None = None) -> RendererInfo:
        """What the server's renderer for `model` and `chat_template_kwargs` declares
        (stop tokens, prefix stability, modality map, class, config, attributes); asked
        once, then kept. Safe from many threads: at worst two ask at once."""
        key = (model, dump_json(dict(chat_template_kwargs or {}), "chat_template_kwargs"))
        info = self._renderer_infos.get(key)
        if info is None:
            default = self._model_info(model).renderer_info if not chat_template_kwargs else None
            if default is None:
                request = encode_describe_request(model, chat_template_kwargs)
                default = decode_renderer_info(self._call("DescribeRenderer", request, None, model))
            info = self._renderer_infos[key] = default
        return info

    def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample:
        """One build_training_sample call on the server (RenderTrainingSample)."""
        data = encode_sample_request(request).SerializeToString()
        sample: RenderedTrainingSample = self._with_images(
            "RenderTrainingSample", request.model, data, timeout, decode_response
        )
        return sample

    def render_tokens(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        ids_only: bool = False,
        process_multimodal: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Renderer.render on the server (Render): a renderers.RenderedTokens (with ids_only,
        render_ids: only its token_ids are filled in). `process_multimodal` None: not passed."""
        request = encode_render_request(
            model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            ids_only=ids_only,
            process_multimodal=process_multimodal,
        )
        return self._with_images("Render", model, request.SerializeToString(), timeout, decode_tokens_response)

    def parse_response(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        tools: Sequence[Any] | None = None,
        prompt_ids: Sequence[int] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Renderer.parse_response on the server (ParseResponse): a renderers.ParsedResponse."""
        request = encode_parse_request(
            model, token_ids, tools=tools, prompt_ids=prompt_ids, chat_template_kwargs=chat_template_kwargs
        )
        return decode_parsed_response(self._call("ParseResponse", request, timeout, model))

    def bridge_to_next_turn(
        self,
        model: str,
        previous_prompt_ids: Sequence[int],
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[Message],
        *,
        tools: Sequence[Any] | None = None,
        previous_multi_modal_data: Any = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        process_multimodal: bool | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Renderer.bridge_to_next_turn on the server (BridgeToNextTurn): renderers.RenderedTokens or None.

        The items of `previous_multi_modal_data` stay here (images.py): the answer carries them back as
        these very item dicts, as in-process, without their tensors crossing the wire either way.
        """
        # A server that takes held items passes them through; an older one needs their tensors.
        keep = previous_multi_modal_data is not None and self._server_models().held_images
        request = encode_bridge_request(
            model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            previous_multi_modal_data=previous_multi_modal_data,
            chat_template_kwargs=chat_template_kwargs,
            process_multimodal=process_multimodal,
            keep_previous_tensors=keep,
        )
        return self._with_images(
            "BridgeToNextTurn",
            model,
            request,
            timeout,
            decode_tokens_response,
            previous_multi_modal_data if keep else None,
        )

    def _with_images(
        self,
        method: str,
        model: str,
        request: bytes,
        timeout: float | None,
        decode: Callable[[Any], Any],
        previous: Any = None,
    ) -> Any:
        """The decoded answer to a call whose answer may carry images, each image's tensors sent and
        held once (images.py): the call claims the images the client holds, and the answer's held
        items get the arrays held; its new items are kept."""
        store = self._in_this_process.images
        deadline = deadline_for(timeout or self._timeout)
        images = request_images(request, method) if store.max_bytes and self._may_carry_images(model) else []
        claim = self._claim(store, model, images, deadline)
        try:
            sent = with_held_mm_hashes(request, method, claim.held) if claim.held else request
            result = decode(self._call(method, sent, None, model, deadline))
            media = getattr(result, "multi_modal_data", None)
            try:
                store.fill(claim, media, previous)
            except MissingHeldItem:  # the server left out what this call did not claim: ask without claims
                result = decode(self._call(method, request, None, model, deadline))
                media = getattr(result, "multi_modal_data", None)
                store.fill(claim, media, previous)
            self._tensors(result)
            store.keep(claim, media, previous)
            return result
        finally:
            store.release(claim)

    @staticmethod
    def _claim(store: ImageStore, model: str, images: list[memoryview], deadline: float | None) -> Claim:
        """What a call carrying `images` claims, once the calls carrying them first are answered."""
        while True:
            claimed = store.claim(model, images)
            if isinstance(claimed, Claim):
                return claimed
            for waiter in claimed:
                assert isinstance(waiter, threading.Event)
                if not waiter.wait(remaining(deadline)):
                    raise DeadlineExceededError(DEADLINE_DETAILS)

    def _may_carry_images(self, model: str) -> bool:
        """ServerModels.may_carry_images, before the models are known too."""
        return self._models is None or self._models.may_carry_images(model)

    def _server_models(self) -> ServerModels:
        if self._models is None:
            self._models = self.list_models()
        return self._models

    def _call(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        model: str | None = None,
        deadline: float | None = None,
    ) -> Any:
        """A unary call of `method` (until `deadline`, else for `timeout` or the client's), resent while
        the server is restarting or going away; coalesced with other threads' calls where it can be.

        The answer about `model` is checked against the replicas that answered before (consistency.py).
        """
        current = self._in_this_process
        connection = current.connection
        if deadline is None:
            deadline = deadline_for(timeout or self._timeout)
        if method in COALESCED:
            request = serialized(request)  # these methods' stubs take and answer bytes
            if current.coalescer is not None:
                check = None if model is None else functools.partial(self._pins.require, model)
                return current.coalescer.call(
                    method, request, deadline, lambda: self._unary(connection, method, request, deadline, model), check
                )
        return self._unary(connection, method, request, deadline, model)

    def _unary(
        self, connection: Connection, method: str, request: Any, deadline: float | None, model: str | None
    ) -> Any:
        """A unary call, resent while the server is restarting or going away."""
        attempt = 0
        while True:
            try:
                stub = getattr(connection.next_stub(), method)
                response, call = stub.with_call(request, timeout=remaining(deadline), metadata=connection.metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            else:
                if model is not None:
                    self._pins.require(model, decode_identity(call.trailing_metadata()))
                return answer_of(method, response) if method in COALESCED else response
            delay = connection.resend_delay(error, attempt, deadline)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def render_many(
        self,
        requests: Iterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[RenderedTrainingSample | RenderError]:
        """Render every request, yielding results in input order, at most `concurrency` in flight.

        Requests go over RenderTrainingSamples streams, one per connection. A
        request that fails raises its RenderError when its turn comes (ending
        the iteration), or with `return_exceptions` is yielded in its place.
        `timeout` bounds the whole iteration; by default it has none.
        """
        return self._streamed(SAMPLES, requests, concurrency, return_exceptions, timeout)

    def render_many_tokens(
        self,
        requests: Iterable[TokensRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Renderer.render for every request (from `RemoteRenderer.render_request`), yielding
        renderers.RenderedTokens in input order over Renders streams: `render_many` for prompts."""
        return self._streamed(TOKENS, requests, concurrency, return_exceptions, timeout)

    def _streamed(
        self,
        method: StreamMethod[ItemT, RequestT, ResultT],
        requests: Iterable[ItemT | RequestT],
        concurrency: int,
        return_exceptions: bool,
        timeout: float | None,
    ) -> Iterator[ResultT | RenderError]:
        current = self._in_this_process
        images = StreamImages(current.images, method.request_class, method.encode, self._may_carry_images)
        results = render_many(
            current.connection.stubs,
            map(images.request, requests),
            method=method,
            concurrency=concurrency,
            timeout=timeout,
            metadata=current.connection.metadata,
            return_exceptions=return_exceptions,
            check=self._pins.check,
        )
        return _settled(results, images, self._tensors, return_exceptions)

    def _tensors(self, result: T) -> T:
        """`result` with its compact pixel tensors rebuilt into arrays, unless they are to be kept."""
        if not self._compact_tensors:
            materialize_all(result)
        return result

    def list_models(self, *, timeout: float | None = None) -> ServerModels:
        """The models the server has loaded, with library versions and tokenizer fingerprints."""
        return decode_models(self._call("ListModels", pb.ListModelsRequest(), timeout))

    def close(self) -> None:
        self._closed = True
        current = self._process_connection
        if current is not None and current.pid == os.getpid():
            current.connection.closed = True
            for channel in current.connection.channels:
                channel.close()

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class _ProcessConnection:
    """A client's connection in one process (channels do not survive a fork), and its coalescer."""

    pid: int
    connection: Connection
    coalescer: Coalescer | None
    images: ImageStore  # each process holds its own


def _settled(
    results: Iterator[T], images: StreamImages, finish: Callable[[Any], Any], return_exceptions: bool
) -> Iterator[T]:
    """A stream's results, each with its held items filled in and its tensors `finish`ed."""
    try:
        for result in results:
            settled = images.result(result, finish)
            if isinstance(settled, RenderError) and not return_exceptions:
                raise settled  # a malformed answer: raised as the stream raises its errors
            yield settled
    finally:
        results.close()  # type: ignore[attr-defined]  # the streams end with the caller's loop
        images.close()


# Guards opening a client's connection. A child process gets it unlocked whatever
# its parent's threads were doing when it forked.
_connect_lock = threading.Lock()


def _new_connect_lock() -> None:
    global _connect_lock
    _connect_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_connect_lock)


def build_training_sample(
    renderer: RemoteRenderer,
    messages: Sequence[Message],
    *,
    role_to_mask: Callable[[Message], bool] | None = None,
    tools: Sequence[Any] | None = None,
    content_sft_roles: Iterable[str] | None = None,
    ensure_final_stop: bool = False,
    message_loss_mask: Sequence[bool | int] | None = None,
) -> RenderedTrainingSample:
    """`renderers.build_training_sample`, rendered by the server behind `renderer`.

    Same signature and same result as the in-process call; `role_to_mask` may
    be any callable (the client evaluates it on each message and sends the answers).
    """
    request = renderer.request(
        messages,
        role_to_mask=role_to_mask,
        tools=tools,
        content_sft_roles=content_sft_roles,
        ensure_final_stop=ensure_final_stop,
        message_loss_mask=message_loss_mask,
    )
    if not isinstance(renderer.client, RenderClient):
        raise TypeError("an AsyncRenderClient's renderer: use render_client.aio.build_training_sample")
    return renderer.client.render(request)
