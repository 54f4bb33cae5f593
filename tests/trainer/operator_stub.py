"""A stand-in for the operator's progress endpoint, on loopback."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Operator:
    """A stand-in for the operator's progress endpoint on loopback."""

    def __init__(self, *, delay_s: float = 0.0, status: int = 200, tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate file, key file) to serve HTTPS."""
        self.received: list[tuple[dict[str, Any], str | None]] = []
        self.delay_s = delay_s
        self.status = status
        # The reply's body, as the operator's (accepted, and the requests waiting); None: empty.
        self.reply: dict[str, Any] | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(outer.delay_s)
                outer.received.append((body, self.headers.get("Authorization")))
                self.send_response(outer.status)
                reply = json.dumps(outer.reply).encode() if outer.reply is not None else b""
                if reply:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/report"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
