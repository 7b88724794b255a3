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

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from render_wire.compact import materialize_all
from render_wire.errors import ModelNotFoundError, RenderError, error_from_rpc
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
from .consistency import Pins
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
        """
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        self._settings = ConnectionSettings(target, connections, token, credentials, tuple(options))
        self._timeout = timeout
        self._compact_tensors = compact_tensors
        self._process_connection: tuple[int, Connection] | None = None
        self._closed = False
        # What the server declares, kept across forks and pickling: it does not change.
        self._models: ServerModels | None = None
        self._renderer_infos: dict[tuple[str, str], RendererInfo] = {}
        # Each model's fingerprint as the first replica to answer declared it: kept across forks and pickling.
        self._pins = Pins()

    @property
    def _connection(self) -> Connection:
        """This process's connection, opened on first use."""
        current = self._process_connection
        pid = os.getpid()
        if current is not None and current[0] == pid:
            return current[1]
        with _connect_lock:
            current = self._process_connection
            if current is None or current[0] != pid:  # first use, or a child of the process that opened it
                connection = self._settings.connect(asyncio=False)
                connection.closed = self._closed
                current = self._process_connection = (pid, connection)
        return current[1]

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
        if self._models is None:
            self._models = self.list_models()
        try:
            return self._models.get(model)
        except KeyError:
            available = ", ".join(info.id for info in self._models.models)
            raise ModelNotFoundError(f"model: no model {model!r} (this server has {available})") from None

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
        return self._tensors(
            decode_response(self._call("RenderTrainingSample", encode_sample_request(request), timeout, request.model))
        )

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
        return self._tensors(decode_tokens_response(self._call("Render", request, timeout, model)))

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
        """Renderer.bridge_to_next_turn on the server (BridgeToNextTurn): renderers.RenderedTokens or None."""
        request = encode_bridge_request(
            model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            previous_multi_modal_data=previous_multi_modal_data,
            chat_template_kwargs=chat_template_kwargs,
            process_multimodal=process_multimodal,
        )
        return self._tensors(decode_tokens_response(self._call("BridgeToNextTurn", request, timeout, model)))

    def _call(self, method: str, request: Any, timeout: float | None, model: str | None = None) -> Any:
        """A unary call of `method`, resent while the server is restarting or going away.

        The answer about `model` is checked against the replicas that answered before (consistency.py).
        """
        connection = self._connection
        deadline = deadline_for(timeout or self._timeout)
        attempt = 0
        while True:
            try:
                stub = getattr(connection.next_stub(), method)
                response, call = stub.with_call(request, timeout=remaining(deadline), metadata=connection.metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            else:
                if model is not None:
                    mismatch = self._pins.check(model, decode_identity(call.trailing_metadata()))
                    if mismatch is not None:
                        raise mismatch
                return response
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
        connection = self._connection
        results = render_many(
            connection.stubs,
            requests,
            method=method,
            concurrency=concurrency,
            timeout=timeout,
            metadata=connection.metadata,
            return_exceptions=return_exceptions,
            check=self._pins.check,
        )
        return results if self._compact_tensors else _materialized(results)

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
        if current is not None and current[0] == os.getpid():
            current[1].closed = True
            for channel in current[1].channels:
                channel.close()

    def __enter__(self) -> RenderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _materialized(results: Iterator[T]) -> Iterator[T]:
    try:
        for result in results:
            yield materialize_all(result)
    finally:
        results.close()  # type: ignore[attr-defined]  # the streams end with the caller's loop


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
