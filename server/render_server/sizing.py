"""The most memory a pod of render-server can use, from its flags: the one sizing formula.

    python -m render_server.sizing [render-server flags]

prints each process's share and the pod's total, as the Kubernetes quantity to
set as the container's memory request and limit (deploy/k8s/deployment.yaml
does; tests/deploy/test_manifests.py holds it to this module). The terms, each
an upper bound of what was measured (docs/server.md "Sizing", bench/README.md):

- Start-up: the loaded models and libraries, ~0.25-0.3 GiB of RSS in every
  process, nearly all of it shared copy-on-write with the supervisor, so the
  pod counts it once; each process adds the pages it writes after forking.
- P, the pixel tensors of the largest request: pixel_values hold 24 bytes per
  pixel (float32, 3 channels, 2 temporal copies) of each image as the
  processor resized it, at most --max-image-pixels each, --max-images of them.
- A render process: its image cache (--image-cache-mb) and one render's
  working set, at most 4.5 P (decoded images, processor arrays, the encoded
  answer; measured 2-2.9 P).
- A gRPC process: the requests its handler threads hold (--threads of them, up
  to --max-request-mb each, a copy on each side of the hand-over), and the
  answers it is sending, one per render process at ~2x its bytes (an answer
  is at most P; clients that read their answers as they come, as trainers do).
- T, the tensors a request may carry back (BridgeToNextTurn's
  previous_multi_modal_data): --max-tensor-mb, or what --max-request-mb of
  compact codes can stand for if less (x 128: float64, 16 copies). A render
  process bridging them holds ~3 T (measured 2.6), over JSON ~9 T (8.5).
- The HTTP process: the bodies of the renders it admits (--max-concurrent-rpcs
  of them, up to --max-request-mb each), and the JSON answer it is sending.
- Its render process, which parses and renders the JSON: its image cache, the
  body it parses, and one JSON render (~7 P: base64 and JSON text on top of the
  arrays; ~9 T for a bridge).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30

STARTUP_SHARED = 0.3 * GiB  # per pod: models and libraries, shared copy-on-write by every process
STARTUP_PRIVATE = 0.05 * GiB  # per process: what each writes of its own after forking
PIXEL_BYTES = 24  # bytes of pixel_values per pixel: float32 x 3 channels x 2 temporal copies
RENDER_WORKING_SET = 4.5  # x P: one render in a render process
ANSWER_COPIES = 2.0  # x an answer's bytes, while a gRPC process sends it
HTTP_WORKING_SET = 7.0  # x P: one JSON render in the HTTP process's render process
TENSOR_EXPANSION = 128  # the most bytes compact codes decode to, per byte: float64 x 16 copies (compact.py)
BRIDGE_WORKING_SET = 3.0  # x T: a BridgeToNextTurn in a render process
JSON_BRIDGE_WORKING_SET = 9.0  # x T: one over JSON
JSON_ANSWER = 1.5  # x its tensors: a JSON answer (base64 and JSON text), held by the HTTP process as it sends it
REQUEST_COPIES = 2  # a request held by a gRPC handler and read by its render process


@dataclass(frozen=True)
class Sizing:
    """render-server's flags that bound its memory: `from_args` reads them, defaults included, as cli.py does."""

    workers: int
    render_processes: int
    threads: int
    image_cache_mb: float
    max_images: int
    max_image_pixels: int
    max_request_mb: float
    max_concurrent_rpcs: int
    max_tensor_mb: float
    http: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sizing:
        """From render-server's parsed flags (cli.parse_args)."""
        return cls(
            workers=args.workers,
            render_processes=args.render_processes,
            threads=args.threads,
            image_cache_mb=args.image_cache_mb,
            max_images=args.max_images,
            max_image_pixels=args.max_image_pixels,
            max_request_mb=args.max_request_mb,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_tensor_mb=args.max_tensor_mb,
            http=not args.no_http,
        )

    @property
    def request_pixels(self) -> float:
        """P: bytes of pixel tensors of the largest request the limits let in."""
        return PIXEL_BYTES * self.max_images * self.max_image_pixels

    @property
    def request_tensors(self) -> float:
        """T: bytes the tensors of one request may decode to."""
        return min(self.max_tensor_mb * MiB, TENSOR_EXPANSION * self.max_request_mb * MiB)

    def processes(self) -> dict[str, tuple[int, float]]:
        """Each kind of process: (how many, the most bytes each holds beyond the shared start-up)."""
        cache = self.image_cache_mb * MiB
        request = self.max_request_mb * MiB
        p = self.request_pixels
        t = self.request_tensors
        kinds = {
            "supervisor": (1, STARTUP_PRIVATE),
            "render process": (
                self.workers * self.render_processes,
                STARTUP_PRIVATE + cache + max(RENDER_WORKING_SET * p, BRIDGE_WORKING_SET * t),
            ),
            "gRPC process": (
                self.workers,
                STARTUP_PRIVATE + REQUEST_COPIES * self.threads * request + self.render_processes * ANSWER_COPIES * p,
            ),
        }
        if self.http:
            kinds["HTTP process"] = (
                1,
                STARTUP_PRIVATE + self.max_concurrent_rpcs * request + JSON_ANSWER * max(p, t),
            )
            kinds["HTTP render process"] = (
                1,
                STARTUP_PRIVATE + cache + request + max(HTTP_WORKING_SET * p, JSON_BRIDGE_WORKING_SET * t),
            )
        return kinds

    def process_rss(self, kind: str) -> float:
        """The most RSS one process of `kind` reaches (shared pages included)."""
        return STARTUP_SHARED + self.processes()[kind][1]

    def pod_bytes(self) -> float:
        """The pod's worst case: shared start-up once, plus every process's own."""
        return STARTUP_SHARED + sum(count * each for count, each in self.processes().values())

    def memory_quantity(self) -> str:
        """pod_bytes rounded up to a whole GiB, as a Kubernetes quantity ("13Gi")."""
        return f"{math.ceil(self.pod_bytes() / GiB)}Gi"


def main(argv: list[str] | None = None) -> int:
    from .cli import parse_args  # the flags and their defaults, exactly as render-server reads them

    sizing = Sizing.from_args(parse_args(argv))
    print(f"P (pixel tensors of the largest request): {sizing.request_pixels / MiB:,.0f} MiB")
    print(f"T (tensors a request may carry back): {sizing.request_tensors / MiB:,.0f} MiB")
    print(f"{'process':<19} {'count':>5} {'each, MiB':>11}")
    print(f"{'start-up, shared':<19} {1:>5} {STARTUP_SHARED / MiB:>11,.0f}")
    for kind, (count, each) in sizing.processes().items():
        print(f"{kind:<19} {count:>5} {each / MiB:>11,.0f}")
    print(f"pod: {sizing.pod_bytes() / GiB:.2f} GiB; memory request = limit: {sizing.memory_quantity()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
