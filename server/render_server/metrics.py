"""Prometheus metrics, recorded by every server process and added up for /metrics.

prometheus_client's multiprocess mode: each process writes its values to files
in the directory PROMETHEUS_MULTIPROC_DIR names, and /metrics (http_app.py)
reads them all. prometheus_client picks that mode when it is imported, so the
directory is set up (cli.prepare_metrics_dir) before anything imports this module.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "render_requests", "Requests answered, by method, model and gRPC status code.", ["method", "model", "code"]
)
LATENCY = Histogram(
    "render_request_duration_seconds",
    "Time from request to answer inside the server (a stream item: from its batch's arrival), by method and model.",
    ["method", "model"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter("render_tokens", "Tokens rendered into samples, by model.", ["model"])
IMAGES = Counter("render_images", "Images decoded and processed, by model.", ["model"])
RENDER_CPU = Counter(
    "render_renderer_cpu_seconds", "CPU seconds spent inside renderers.build_training_sample, by model.", ["model"]
)
IN_FLIGHT = Gauge(
    "render_requests_in_flight",
    "Calls taken and not yet answered (queued for the render process included; a stream counts once), by method.",
    ["method"],
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter("render_worker_restarts", "Worker processes started again after dying.")

# Answers for requests naming no loaded model share one label, so that callers
# cannot grow the metrics without bound.
UNKNOWN_MODEL = "-"


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of all processes' metrics, and its content type."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_died(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay in the totals)."""
    multiprocess.mark_process_dead(pid)
