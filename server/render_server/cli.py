"""`render-server`: load the registry, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from .registry import ModelRegistry
from .server import ServerOptions, start_server

log = logging.getLogger("render_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerOptions()
    parser = argparse.ArgumentParser(
        prog="render-server", description="Serve renderers.build_training_sample over gRPC."
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG_PATH, help="model registry TOML (default: the embedded registry)"
    )
    parser.add_argument(
        "--host", default=defaults.host, help="address to listen on (default: %(default)s; 0.0.0.0 for all)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="gRPC port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads, help="handler threads (default: %(default)s)")
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=defaults.max_request_bytes / 2**20,
        help="largest request accepted, MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight calls get to finish on shutdown (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Tokenizers' own thread pool only helps batch encodes; renders are single calls.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    try:
        registry = ModelRegistry.load(load_config(args.config))
    except ConfigError as exc:
        log.error("bad model registry: %s", exc)
        return 2
    options = ServerOptions(
        host=args.host, port=args.port, threads=args.threads, max_request_bytes=int(args.max_request_mb * 2**20)
    )
    running = start_server(registry, options)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    models = ", ".join(model.id for model in registry.describe().models)
    # Tests and scripts wait for this line: the server is loaded and listening.
    print(f"render-server listening on {options.host}:{running.port} with models {models}", flush=True)
    log.info("ready in %.1fs", time.perf_counter() - started)
    stop.wait()
    running.set_serving(False)
    running.server.stop(args.grace).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
