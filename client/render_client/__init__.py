"""render_client: trainers' side of render-service.

`build_training_sample(client.renderer("qwen3"), messages, ...)` returns what
`renderers.build_training_sample` returns in-process, rendered by the server.
`serve_renderers("host:port")` at start-up makes renderers' own `create_renderer`
return the server's renderers, for trainers that build them themselves.
Needs only grpcio, protobuf and numpy (and pillow only to pass PIL images).
"""

from render_wire.compact import CompactTensor
from render_wire.errors import (
    CallCancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelNotFoundError,
    RenderError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from render_wire.types import (
    ModelInfo,
    MultiModalData,
    PlaceholderRange,
    RenderedTrainingSample,
    SampleRequest,
    ServerModels,
    TokensRequest,
)

from .channel import target_for, tls_credentials
from .client import RenderClient, build_training_sample
from .consistency import ReplicaMismatchError
from .fingerprint import tokenizer_fingerprint
from .renderer import AsyncRemoteRenderer, RemoteMultimodalRenderer, RemoteRenderer
from .switch import RendererSwitch, ServedTokenizer, serve_renderers, stop_serving_renderers

__all__ = [
    "AsyncRemoteRenderer",
    "CallCancelledError",
    "CompactTensor",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelNotFoundError",
    "MultiModalData",
    "PlaceholderRange",
    "RemoteMultimodalRenderer",
    "RemoteRenderer",
    "RenderClient",
    "RenderError",
    "RenderedTrainingSample",
    "RendererSwitch",
    "ReplicaMismatchError",
    "ResourceExhaustedError",
    "SampleRequest",
    "ServedTokenizer",
    "ServerModels",
    "TokensRequest",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "build_training_sample",
    "serve_renderers",
    "stop_serving_renderers",
    "target_for",
    "tls_credentials",
    "tokenizer_fingerprint",
]
