"""`render-server`: load the registry, serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from .registry import ModelRegistry
from .server import ServerOptions
from .workers import Supervisor, reserved_port

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
    parser.add_argument(
        "--workers", type=int, default=available_cpus(), help="worker processes, one per core (default: %(default)s)"
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
    with contextlib.ExitStack() as stack:
        try:
            # Hold the port first: a clash fails at once, not after loading the models.
            port = stack.enter_context(reserved_port(args.host, args.port))
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
            return 2
        try:
            registry = ModelRegistry.load(load_config(args.config))
        except ConfigError as exc:
            log.error("bad model registry: %s", exc)
            return 2
        options = ServerOptions(
            host=args.host, port=port, threads=args.threads, max_request_bytes=int(args.max_request_mb * 2**20)
        )
        models = ", ".join(model.id for model in registry.describe().models)

        def on_ready() -> None:
            # Tests and scripts wait for this line: every worker is loaded and listening.
            print(f"render-server listening on {args.host}:{port} with models {models}", flush=True)
            log.info("ready in %.1fs with %d workers", time.perf_counter() - started, args.workers)

        return Supervisor(registry, options, workers=args.workers, grace=args.grace).run(on_ready)


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


if __name__ == "__main__":
    sys.exit(main())
