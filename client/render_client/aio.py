"""The asyncio client: the blocking client's API with `await`.

from render_client.aio import AsyncRenderClient, build_training_sample

async with AsyncRenderClient("render-service:50051") as client:
    renderer = client.renderer("qwen3")
    sample = await build_training_sample(renderer, messages)
    async for sample in client.render_many(requests, concurrency=32):
        ...
    # renderers' protocol, awaited (rollout servers):
    prompt = await renderer.render(messages, add_generation_prompt=True)
    parsed = await renderer.parse_response(completion_ids, prompt_ids=prompt.token_ids)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from render_wire.compact import materialize_all
from render_wire.errors import (
    CallCancelledError,
    DeadlineExceededError,
    RenderError,
    error_from_rpc,
)
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

from .async_streams import CALL_CANCELLED, cancelled_by_grpc, render_many
from .channel import ChannelOptions, Connection, deadline_for, remaining
from .coalescing import (
    COALESCED,
    DEADLINE_DETAILS,
    DEFAULT_WINDOW,
    AsyncCoalescer,
    answer_of,
    serialized,
)
from .consistency import Pins
from .images import DEFAULT_IMAGE_MEMORY_MB, Claim, ImageStore, MiB, MissingHeldItem, StreamImages
from .renderer import AsyncRemoteRenderer
from .streaming import SAMPLES, TOKENS, ItemT, RequestT, ResultT, StreamMethod

Message = Mapping[str, Any]


class AsyncRenderClient:
    """An asyncio connection to render-service; use it from one event loop."""

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
        """As RenderClient: `timeout` per unary call, `connections` HTTP/2 connections, `token`, TLS,
        `compact_tensors` to keep pixel tensors in their compact form, `coalesce_window` for the
        calls its tasks make at once, `image_memory_mb` for the images it holds."""
        if coalesce_window is not None and not coalesce_window >= 0:
            raise ValueError(f"coalesce_window must be a number of seconds, at least 0, or None; got {coalesce_window}")
        if not image_memory_mb >= 0:
            raise ValueError(f"image_memory_mb must be at least 0, got {image_memory_mb}")
        self._connection = Connection(
            target, connections=connections, token=token, credentials=credentials, options=options, asyncio=True
        )
        self._timeout = timeout
        self._compact_tensors = compact_tensors
        self._coalescer = None if coalesce_window is None else AsyncCoalescer(self._connection, coalesce_window)
        self._images = ImageStore(int(image_memory_mb * MiB), asyncio.Event)
        self._models: ServerModels | None = None
        self._renderer_infos: dict[tuple[str, str], RendererInfo] = {}
        self._pins = Pins()  # each model's fingerprint as the first replica to answer declared it

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> AsyncRemoteRenderer:
        """The server's renderer for `model`, with renderers' protocol methods awaitable (renderer.py);
        pass it to `build_training_sample` too. Asks the server nothing until used."""
        return AsyncRemoteRenderer(self, model, chat_template_kwargs)

    async def renderer_info(self, model: str, chat_template_kwargs: Mapping[str, Any] | None = None) -> RendererInfo:
        """As RenderClient.renderer_info: what the server's renderer declares; asked once, then kept."""
        key = (model, dump_json(dict(chat_template_kwargs or {}), "chat_template_kwargs"))
        info = self._renderer_infos.get(key)
        if info is None:
            default = (await self._model_info(model)).renderer_info if not chat_template_kwargs else None
            if default is None:
                request = encode_describe_request(model, chat_template_kwargs)
                default = decode_renderer_info(await self._call("DescribeRenderer", request, None, model))
            info = self._renderer_infos[key] = default
        return info

    async def _model_info(self, model: str) -> ModelInfo:
        return (await self._server_models()).info(model)

    async def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample:
        """One build_training_sample call on the server (RenderTrainingSample)."""
        data = encode_sample_request(request).SerializeToString()
        sample: RenderedTrainingSample = await self._with_images(
            "RenderTrainingSample", request.model, data, timeout, decode_response
        )
        return sample

    async def render_tokens(
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
        """As RenderClient.render_tokens: Renderer.render (or render_ids) on the server."""
        request = encode_render_request(
            model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            ids_only=ids_only,
            process_multimodal=process_multimodal,
        )
        return await self._with_images("Render", model, request.SerializeToString(), timeout, decode_tokens_response)

    async def parse_response(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        tools: Sequence[Any] | None = None,
        prompt_ids: Sequence[int] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """As RenderClient.parse_response: Renderer.parse_response on the server."""
        request = encode_parse_request(
            model, token_ids, tools=tools, prompt_ids=prompt_ids, chat_template_kwargs=chat_template_kwargs
        )
        return decode_parsed_response(await self._call("ParseResponse", request, timeout, model))

    async def bridge_to_next_turn(
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
        """As RenderClient.bridge_to_next_turn: renderers.RenderedTokens or None (the previous items
        stay here and come back as the very item dicts passed)."""
        keep = previous_multi_modal_data is not None and (await self._server_models()).held_images
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
        return await self._with_images(
            "BridgeToNextTurn",
            model,
            request,
            timeout,
            decode_tokens_response,
            previous_multi_modal_data if keep else None,
        )

    def _tensors(self, result: Any) -> Any:
        return result if self._compact_tensors else materialize_all(result)

    async def _with_images(
        self,
        method: str,
        model: str,
        request: bytes,
        timeout: float | None,
        decode: Callable[[Any], Any],
        previous: Any = None,
    ) -> Any:
        """As RenderClient._with_images: each image's tensors sent and held once (images.py)."""
        store = self._images
        deadline = deadline_for(timeout or self._timeout)
        models = self._models  # a model the server says takes no images: nothing to learn from its requests
        carries = models is None or models.may_carry_images(model)
        images = request_images(request, method) if store.max_bytes and carries else []
        claim = await self._claim(model, images, deadline)
        try:
            sent = with_held_mm_hashes(request, method, claim.held) if claim.held else request
            result = decode(await self._call(method, sent, None, model, deadline))
            media = getattr(result, "multi_modal_data", None)
            try:
                store.fill(claim, media, previous)
            except MissingHeldItem:  # the server left out what this call did not claim: ask without claims
                result = decode(await self._call(method, request, None, model, deadline))
                media = getattr(result, "multi_modal_data", None)
                store.fill(claim, media, previous)
            self._tensors(result)
            store.keep(claim, media, previous)
            return result
        finally:
            store.release(claim)

    async def _claim(self, model: str, images: list[memoryview], deadline: float | None) -> Claim:
        while True:
            claimed = self._images.claim(model, images)
            if isinstance(claimed, Claim):
                return claimed
            for waiter in claimed:
                assert isinstance(waiter, asyncio.Event)
                try:
                    await asyncio.wait_for(waiter.wait(), remaining(deadline))
                except TimeoutError:
                    raise DeadlineExceededError(DEADLINE_DETAILS) from None

    async def _server_models(self) -> ServerModels:
        if self._models is None:
            self._models = await self.list_models()
        return self._models

    async def _call(
        self,
        method: str,
        request: ProtoMessage | bytes,
        timeout: float | None,
        model: str | None = None,
        deadline: float | None = None,
    ) -> Any:
        """A unary call of `method`, resent while the server is restarting or going away, coalesced with
        other tasks' calls where it can be (as RenderClient's); the answer about `model` checked against
        the replicas that answered before (consistency.py)."""
        if deadline is None:
            deadline = deadline_for(timeout or self._timeout)
        if method in COALESCED:
            request = serialized(request)  # these methods' stubs take and answer bytes
            if self._coalescer is not None:
                data = request
                check = None if model is None else functools.partial(self._pins.require, model)
                return await self._coalescer.call(
                    method, data, deadline, lambda: self._unary(method, data, deadline, model), check
                )
        return await self._unary(method, request, deadline, model)

    async def _unary(
        self, method: str, request: ProtoMessage | bytes, deadline: float | None, model: str | None
    ) -> Any:
        """A unary call, resent while the server is restarting or going away."""
        attempt = 0
        while True:
            try:
                stub = getattr(self._connection.next_stub(), method)
                call = stub(request, timeout=remaining(deadline), metadata=self._connection.metadata)
                response = await call
                if model is not None:
                    self._pins.require(model, decode_identity(await call.trailing_metadata()))
                return answer_of(method, response) if method in COALESCED else response
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            except asyncio.CancelledError:
                if not cancelled_by_grpc():
                    raise
                error = CallCancelledError(CALL_CANCELLED)  # the client was closed meanwhile
            delay = self._connection.resend_delay(error, attempt, deadline)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    def render_many(
        self,
        requests: Iterable[SampleRequest] | AsyncIterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[RenderedTrainingSample | RenderError]:
        """As RenderClient.render_many, as an async iterator."""
        return self._streamed(SAMPLES, requests, concurrency, return_exceptions, timeout)

    def render_many_tokens(
        self,
        requests: Iterable[TokensRequest] | AsyncIterable[TokensRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """As RenderClient.render_many_tokens, as an async iterator."""
        return self._streamed(TOKENS, requests, concurrency, return_exceptions, timeout)

    def _streamed(
        self,
        method: StreamMethod[ItemT, RequestT, ResultT],
        requests: Iterable[ItemT | RequestT] | AsyncIterable[ItemT | RequestT],
        concurrency: int,
        return_exceptions: bool,
        timeout: float | None,
    ) -> AsyncIterator[ResultT | RenderError]:
        images = StreamImages(self._images, method.request_class, method.encode, lambda model: True)
        if isinstance(requests, AsyncIterable):
            claimed: Iterable[Any] | AsyncIterable[Any] = _mapped(images.request, requests)
        else:
            claimed = map(images.request, requests)
        results = render_many(
            self._connection.stubs,
            claimed,
            method=method,
            concurrency=concurrency,
            timeout=timeout,
            metadata=self._connection.metadata,
            return_exceptions=return_exceptions,
            check=self._pins.check,
        )
        return _settled(results, images, self._tensors, return_exceptions)

    async def list_models(self, *, timeout: float | None = None) -> ServerModels:
        """The models the server has loaded, with library versions and tokenizer fingerprints."""
        return decode_models(await self._call("ListModels", pb.ListModelsRequest(), timeout))

    async def close(self) -> None:
        self._connection.closed = True
        for channel in self._connection.channels:
            assert isinstance(channel, grpc.aio.Channel)  # Connection(asyncio=True) opened it
            await channel.close()

    async def __aenter__(self) -> AsyncRenderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _mapped(function: Callable[[Any], Any], items: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for item in items:
        yield function(item)


async def _settled(
    results: AsyncIterator[Any], images: StreamImages, finish: Callable[[Any], Any], return_exceptions: bool
) -> AsyncIterator[Any]:
    """As the blocking client's: each result with its held items filled in and its tensors `finish`ed."""
    try:
        async for result in results:
            settled = images.result(result, finish)
            if isinstance(settled, RenderError) and not return_exceptions:
                raise settled
            yield settled
    finally:
        await results.aclose()  # type: ignore[attr-defined]  # the streams end with the caller's loop
        images.close()


async def build_training_sample(
    renderer: AsyncRemoteRenderer,
    messages: Sequence[Message],
    *,
    role_to_mask: Callable[[Message], bool] | None = None,
    tools: Sequence[Any] | None = None,
    content_sft_roles: Iterable[str] | None = None,
    ensure_final_stop: bool = False,
    message_loss_mask: Sequence[bool | int] | None = None,
) -> RenderedTrainingSample:
    """`renderers.build_training_sample`, awaited, rendered by the server behind `renderer`."""
    request = renderer.request(
        messages,
        role_to_mask=role_to_mask,
        tools=tools,
        content_sft_roles=content_sft_roles,
        ensure_final_stop=ensure_final_stop,
        message_loss_mask=message_loss_mask,
    )
    if not isinstance(renderer.client, AsyncRenderClient):
        raise TypeError("a RenderClient's renderer: use render_client.build_training_sample")
    return await renderer.client.render(request)
