"""`render-server`: flags, start-up, and the hand-over to the supervisor (workers.py)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config, unpinned_sources
from .image_cache import DEFAULT_IMAGE_CACHE_MB, return_large_frees_to_the_os
from .limits import Limits, MiB

if TYPE_CHECKING:
    from .server import TlsFiles

log = logging.getLogger("render_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    limits = Limits()
    parser = argparse.ArgumentParser(
        prog="render-server", description="Serve renderers.build_training_sample over gRPC."
    )
    add = parser.add_argument
    add("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="model registry TOML (default: the embedded registry)")
    add("--host", default="127.0.0.1", help="gRPC address to listen on (default: %(default)s; 0.0.0.0 for all)")
    add("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: %(default)s)")
    add("--http-host", help="HTTP address (health, metrics, JSON render); default: --host")
    add("--http-port", type=int, default=8080, help="HTTP port; 0 picks a free one (default: %(default)s)")
    add("--no-http", action="store_true", help="serve no HTTP port")
    add(
        "--health-port",
        type=int,
        help="serve /healthz and /readyz alone on this port (on --http-host), plaintext, from a process of their "
        "own that renders never slow: for probes (default: none; the HTTP port answers them too)",
    )
    add("--workers", type=int, default=available_cpus(), help="worker processes, one per core (default: %(default)s)")
    add("--threads", type=int, default=32, help="handler threads per worker; a stream holds one (default: %(default)s)")
    add(
        "--render-processes",
        type=positive_int,
        default=2,
        help="render processes per worker; calls go to the least busy, so one long render does not "
        "hold up the rest (default: %(default)s)",
    )
    add(
        "--max-connection-age",
        type=float,
        default=300.0,
        help="seconds before a client connection is closed, so clients find new replicas; 0: never (default: %(default)s)",
    )
    add(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight calls get to finish on SIGTERM (default: %(default)s)",
    )
    add(
        "--raw-tensors",
        action="store_true",
        help="send pixel tensors raw over gRPC, never in their exact compact form (1/8 of the bytes)",
    )
    add(
        "--compression",
        choices=("none", "deflate", "gzip"),  # server.COMPRESSION
        default="none",
        help="gRPC message compression of answers; gzip shrinks compact pixel tensors to ~0.3-0.8x of their "
        "size at ~100-200 ms of server time per 1024x1024 image (default: %(default)s)",
    )
    add(
        "--allow-unpinned-revisions",
        action="store_true",
        help="load hub models whose revision is a branch or tag (or none: 'main'), with a warning; by default "
        "only commit ids, so that replicas started at different times load the same files",
    )
    add("--log-level", default="INFO", help="logging level (default: %(default)s)")
    add(
        "--image-cache-mb",
        type=float,
        default=DEFAULT_IMAGE_CACHE_MB,
        help="processed images kept for images seen again, MiB per process (each render process and the HTTP "
        "process); 0: none (default: %(default)s)",
    )
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--max-request-mb",
        type=float,
        default=limits.max_request_bytes / MiB,
        help="largest request, MiB (default: %(default)s)",
    )
    group.add_argument(
        "--max-messages", type=int, default=limits.max_messages, help="messages per request (default: %(default)s)"
    )
    group.add_argument(
        "--max-images", type=int, default=limits.max_images, help="images per request (default: %(default)s)"
    )
    group.add_argument(
        "--max-image-mb",
        type=float,
        default=limits.max_image_bytes / MiB,
        help="encoded size per image, MiB (default: %(default)s)",
    )
    group.add_argument(
        "--max-image-pixels",
        type=int,
        default=limits.max_image_pixels,
        help="width x height per image, checked before decoding (default: %(default)s)",
    )
    group.add_argument(
        "--image-formats",
        type=image_formats,
        default=",".join(limits.image_formats),
        help="Pillow formats decoded, comma-separated; others are refused (default: %(default)s)",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=limits.max_tokens,
        help="rendered tokens per sample, and token ids per list a request carries (default: %(default)s)",
    )
    group.add_argument(
        "--max-text-bytes-per-token",
        type=positive_int,
        default=limits.max_text_bytes_per_token,
        help="a request's text (all but its media) may be at most --max-tokens x this many bytes, "
        "refused before tokenizing (default: %(default)s)",
    )
    group.add_argument(
        "--max-tensor-mb",
        type=float,
        default=limits.max_tensor_bytes / MiB,
        help="what the tensors of one request (BridgeToNextTurn's previous_multi_modal_data) may decode to, MiB, "
        "counted from their shapes before they are decoded (default: %(default)s)",
    )
    group.add_argument(
        "--max-batch-requests",
        type=positive_int,
        default=limits.max_batch_requests,
        help="requests per batch message of a stream (RenderTrainingSamples, Renders) (default: %(default)s)",
    )
    group.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=limits.max_concurrent_rpcs,
        help="calls per worker at once; more get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    group = parser.add_argument_group("security")
    group.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC and HTTP over TLS")
    group.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    group.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates it signed (mTLS)")
    group.add_argument(
        "--auth-tokens-file", type=Path, help="bearer tokens, one per line (also: $RENDER_SERVICE_TOKENS)"
    )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class _WithoutTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found" notice, which it logs when imported.

    Harmless here: the server uses only tokenizers and the PIL image processors, never a model.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found.")


def main(argv: list[str] | None = None) -> int:
    # First of all: loading the models takes seconds to minutes, and a stop meanwhile must not wait
    # it out (in a container the server is PID 1, which the kernel sends no signal it has no handler
    # for: a pod deleted while loading would sit out its whole grace period). The supervisor
    # installs its own handlers once every model is loaded.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_while_starting)
    # Before anything imports transformers (the registry does, below); forked processes inherit it.
    logging.getLogger("transformers").addFilter(_WithoutTorchNotice())
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not log.isEnabledFor(logging.DEBUG):
        # huggingface_hub's HTTP client logs every request of a hub download at INFO.
        for noisy in ("httpx", "httpx2"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    # Tokenizers' own thread pool only helps batch encodes; renders are single calls (and we fork).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prepare_metrics_dir()
    # Imported only now: prometheus_client chooses multiprocess mode when imported.
    from .auth import load_tokens
    from .registry import ModelRegistry
    from .server import ServerOptions
    from .workers import Supervisor, listening_socket, reserved_port

    started = time.perf_counter()
    try:
        tls = _tls_files(args)
        tokens = load_tokens(args.auth_tokens_file)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * MiB),
        max_messages=args.max_messages,
        max_images=args.max_images,
        max_image_bytes=int(args.max_image_mb * MiB),
        max_image_pixels=args.max_image_pixels,
        image_formats=args.image_formats,
        max_tokens=args.max_tokens,
        max_text_bytes_per_token=args.max_text_bytes_per_token,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_tensor_bytes=int(args.max_tensor_mb * MiB),
        max_batch_requests=args.max_batch_requests,
    )
    with contextlib.ExitStack() as stack:
        http_host = args.http_host or args.host
        try:
            # Hold the ports first: a clash fails at once, not after loading the models.
            port = stack.enter_context(reserved_port(args.host, args.port))
            http_socket = None if args.no_http else stack.enter_context(listening_socket(http_host, args.http_port))
            health_socket = (
                None if args.health_port is None else stack.enter_context(listening_socket(http_host, args.health_port))
            )
        except OSError as exc:
            log.error("cannot listen: %s", exc.strerror or exc)
            return 2
        return_large_frees_to_the_os()  # so that evicted images leave RSS (image_cache.py)
        try:
            configs = load_config(args.config)
            unpinned = unpinned_sources(configs)
            if unpinned and not args.allow_unpinned_revisions:
                raise ConfigError(f"{unpinned[0]} (pin a commit, or pass --allow-unpinned-revisions)")
            for source in unpinned:
                log.warning("%s: replicas started at other times may load other files under this id", source)
            registry = ModelRegistry.load(configs, image_cache_bytes=int(args.image_cache_mb * MiB))
        except ConfigError as exc:
            # One line; the traceback of what failed underneath only at --log-level DEBUG.
            log.error("bad model registry: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return 2
        options = ServerOptions(
            host=args.host,
            port=port,
            threads=args.threads,
            render_processes=args.render_processes,
            compact_tensors=not args.raw_tensors,
            compression=args.compression,
            limits=limits,
            tls=tls,
            tokens=tokens,
            max_connection_age=args.max_connection_age,
        )
        models = ", ".join(model.id for model in registry.describe().models)
        http = "" if http_socket is None else f" http {http_host}:{http_socket.getsockname()[1]}"
        if health_socket is not None:
            http += f" health {http_host}:{health_socket.getsockname()[1]}"

        def on_ready() -> None:
            # Tests and scripts wait for this line: every process is loaded and listening.
            print(f"render-server listening on {args.host}:{port}{http} with models {models}", flush=True)
            log.info("ready in %.1fs with %d workers", time.perf_counter() - started, args.workers)

        supervisor = Supervisor(
            registry,
            options,
            workers=args.workers,
            grace=args.grace,
            http_socket=http_socket,
            health_socket=health_socket,
        )
        return supervisor.run(on_ready)


def _stop_while_starting(signum: int, frame: object) -> None:
    """Stop at once: nothing is served yet, so there is nothing to drain."""
    log.info("%s while starting: stopping", signal.Signals(signum).name)
    raise SystemExit(128 + signum)  # as if the signal had ended the process, after the cleanups ran


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    from .server import TlsFiles

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-client-ca", args.tls_client_ca),
    ):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag}: not a readable file")
    return TlsFiles(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def prepare_metrics_dir() -> None:
    """Give prometheus_client's multiprocess mode an empty directory for this server's lifetime."""
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        # An operator's directory: stale files from an earlier run would add to ours.
        for stale in Path(existing).glob("*.db"):
            stale.unlink()
        return
    directory = tempfile.mkdtemp(prefix="render-server-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    pid = os.getpid()

    def remove() -> None:
        # Only the supervisor removes it: forked children run no atexit handlers (os._exit).
        if os.getpid() == pid:
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def image_formats(text: str) -> tuple[str, ...]:
    """--image-formats, checked against the formats Pillow can open."""
    from . import media  # Pillow's readers: loaded only when the flags are read

    try:
        return media.image_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
