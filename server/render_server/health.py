"""The health port (--health-port): /healthz and /readyz alone, from a process of their own, for probes.

    GET /healthz   200 while the supervisor and every worker are alive, else 503 (status.py)
    GET /readyz    200 when every worker serves and beats and the server is not draining, else 503

The same answers as the HTTP port's, which JSON renders share with them: a render
holds that process's GIL for long stretches, and with TLS its event loop also
encrypts answers of hundreds of MiB, so a probe there can wait for hundreds of
milliseconds. This process does nothing else: it reads the shared status and
answers in a millisecond, whatever the workers and the HTTP port are doing.

Plaintext, whatever --tls-cert says, and it takes no token: it tells only
whether the server is up, and it stays reachable by probes that carry no
client certificate (mutual TLS). Give it a port of its own that only the node
reaches (deploy/k8s: no NetworkPolicy rule lets pods in).
"""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .status import SharedStatus


def serve_health(status: SharedStatus, sock: socket.socket) -> None:
    """Answer /healthz and /readyz on the listening `sock` until the process is stopped; blocks."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                ok, reason = status.liveness()
                code = 200 if ok else 503
            elif self.path == "/readyz":
                ok, reason = status.readiness()
                code = 200 if ok else 503
            else:
                code, reason = 404, "not found: /healthz or /readyz"
            body = (reason + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # a probe every few seconds is no news

    server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock  # bound by the supervisor before it loaded the models: a restart keeps the port
    server.daemon_threads = True
    server.serve_forever()
