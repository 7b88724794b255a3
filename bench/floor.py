"""gRPC Python's own cost per call on this machine, with no rendering at all.

    .venv/bin/python -m bench --only floor

A server process whose one unary method answers at once, or after burning
5 ms of CPU as a render would, is driven through a plain grpcio channel with
payloads the size of a ~1k-token sample's request and answer. The CPU both
processes spend per call beyond the burn is the floor under every
render-service figure: no server built on grpcio's Python server costs less.
A sleep loop measures what this machine charges a thread for waking up: a
server's threads block and wake several times per call, the in-process
anchor never does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench.load import process_cpu

ROOT = Path(__file__).resolve().parent.parent
_SERVICE = "floor.Floor"
_METHOD = f"/{_SERVICE}/Answer"
# About a 1k-token sample: its request (conversation text) and its answer
# (token ids as varints and one loss-mask byte per token).
REQUEST_BYTES = 6000
ANSWER_BYTES = 4000


def _identity(data: bytes) -> bytes:
    return data


def serve(burn: float) -> None:
    """Serve the do-nothing method on a free port, say which, and serve until killed."""
    answer = b"a" * ANSWER_BYTES

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        done = time.thread_time() + burn
        while time.thread_time() < done:  # the stand-in render: CPU, holding the GIL
            pass
        return answer

    server = grpc.server(ThreadPoolExecutor(max_workers=32))
    handler = grpc.unary_unary_rpc_method_handler(handle, _identity, _identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {"Answer": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


def drive(burn: float, concurrency: int, seconds: float) -> dict[str, Any]:
    """Calls per second and CPU per call of both sides, against a fresh server process."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--serve", "--burn", str(burn)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the floor server did not start (exit status {server.poll()})")
        port = int(line.split()[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(_METHOD, _identity, _identity)
            request = b"r" * REQUEST_BYTES
            for _ in range(100):
                call(request)
            deadline = time.perf_counter() + seconds
            counts = [0] * concurrency

            def work(slot: int) -> None:
                while time.perf_counter() < deadline:
                    call(request)
                    counts[slot] += 1

            server_before, client_before = process_cpu(server.pid), time.process_time()
            started = time.perf_counter()
            threads = [threading.Thread(target=work, args=(slot,)) for slot in range(concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            calls = sum(counts)
            server_cpu = (process_cpu(server.pid) - server_before) / calls
            return {
                "handler_cpu_ms": burn * 1e3,
                "concurrency": concurrency,
                "calls_per_s": calls / elapsed,
                "server_cpu_ms_per_call": server_cpu * 1e3,
                "server_overhead_ms_per_call": (server_cpu - burn) * 1e3,
                "server_cpu_over_handler": server_cpu / burn if burn else None,
                "client_cpu_ms_per_call": (time.process_time() - client_before) / calls * 1e3,
            }
    finally:
        server.kill()
        server.wait()


def wake_up_cost(sleep: float, rounds: int) -> dict[str, Any]:
    """CPU this process is charged per `time.sleep(sleep)`: what waking up costs here."""
    started = time.process_time()
    for _ in range(rounds):
        time.sleep(sleep)
    return {"sleep_ms": sleep * 1e3, "cpu_us_per_wake_up": (time.process_time() - started) / rounds * 1e6}


def floor(quick: bool) -> dict[str, Any]:
    seconds = 2.0 if quick else 5.0
    calls = [drive(burn, concurrency, seconds) for burn in (0.0, 0.005) for concurrency in (1, 8)]
    print("\ngRPC Python per unary call, no rendering (6 kB request, 4 kB answer):")
    print(
        "| handler CPU | concurrency | calls/s | server CPU ms/call | beyond the handler | ÷ handler | client CPU ms/call |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in calls:
        ratio = row["server_cpu_over_handler"]
        print(
            f"| {row['handler_cpu_ms']:.0f} ms | {row['concurrency']} | {row['calls_per_s']:.0f} "
            f"| {row['server_cpu_ms_per_call']:.3f} | {row['server_overhead_ms_per_call']:.3f} "
            f"| {f'{ratio:.2f}' if ratio else '-'} | {row['client_cpu_ms_per_call']:.3f} |"
        )
    wake_ups = [wake_up_cost(sleep, min(1000, int(2 / sleep))) for sleep in (0.0001, 0.001, 0.005, 0.02)]
    print("\nCPU charged per wake-up (time.sleep loop):")
    print("| sleep | CPU µs per wake-up |")
    print("|---|---|")
    for row in wake_ups:
        print(f"| {row['sleep_ms']:g} ms | {row['cpu_us_per_wake_up']:.1f} |")
    return {"calls": calls, "wake_ups": wake_ups}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--burn", type=float, default=0.0, help="CPU seconds each call burns")
    args = parser.parse_args()
    if args.serve:
        serve(args.burn)


if __name__ == "__main__":
    main()
