"""render_client: trainers' side of render-service.

`build_training_sample(client.renderer("qwen3"), messages, ...)` returns what
`renderers.build_training_sample` returns in-process, rendered by the server.
Needs only grpcio, protobuf and numpy (and pillow only to pass PIL images).
"""

from .channel import target_for, tls_credentials
from .client import RenderClient, build_training_sample
from .compact import CompactTensor
from .errors import (
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
from .fingerprint import tokenizer_fingerprint
from .types import (
    ModelInfo,
    MultiModalData,
    PlaceholderRange,
    RemoteMultimodalRenderer,
    RemoteRenderer,
    RenderedTrainingSample,
    SampleRequest,
    ServerModels,
    TokensRequest,
)

__all__ = [
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
    "ResourceExhaustedError",
    "SampleRequest",
    "ServerModels",
    "TokensRequest",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "build_training_sample",
    "target_for",
    "tls_credentials",
    "tokenizer_fingerprint",
]
