"""The node agent's part of the kubelet API: container logs, so that ``kubectl logs`` (which the
apiserver proxies to the node's kubelet port) works on the local cluster as on a real one.

It serves ``GET /containerLogs/{namespace}/{pod}/{container}`` with the kubelet's query
parameters ``follow``, ``tailLines`` and ``limitBytes`` over TLS on loopback. Like a kubelet
started without ``--authentication-token-webhook``, it asks the caller for no credentials: it
listens on 127.0.0.1 only and serves a development cluster.
"""

from __future__ import annotations

import http.server
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger("node-agent")

PATH = re.compile(r"^/containerLogs/([a-z0-9.-]+)/([a-z0-9.-]+)/([a-z0-9.-]+)$")
FOLLOW_POLL_SECONDS = 0.2


class LogServer:
    """Serves the logs of the containers the agent runs.

    ``find`` maps (namespace, pod, container) to the container's log file, or None;
    ``running`` says whether that container may still write to it (``follow`` ends when not).
    """

    def __init__(
        self,
        *,
        cert: Path,
        key: Path,
        find: Callable[[str, str, str], Path | None],
        running: Callable[[str, str, str], bool],
    ) -> None:
        self.find = find
        self.running = running
        self.stopping = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.serve(self)

            def log_message(self, format: str, *args: object) -> None:
                LOG.debug("event=kubelet-api %s", format % args)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="kubelet-api", daemon=True)

    def start(self) -> LogServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, request: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        match = PATH.match(url.path)
        if not match:
            self._error(request, 404, f"not found: {url.path} (this node serves /containerLogs only)")
            return
        namespace, pod, container = match.groups()
        query = urllib.parse.parse_qs(url.query)

        def flag(name: str) -> bool:
            return query.get(name, ["false"])[-1].lower() in ("true", "1")

        def number(name: str) -> int | None:
            value = query.get(name, [""])[-1]
            return int(value) if value.isdigit() else None

        if flag("previous"):
            # Pods here never restart a container (restartPolicy Never): no previous instance.
            self._error(request, 400, f'previous terminated container "{container}" in pod "{pod}" not found')
            return
        log = self.find(namespace, pod, container)
        if log is None or not log.is_file():
            self._error(request, 404, f'container "{container}" in pod "{pod}" has no log on this node')
            return
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        request.end_headers()
        limit = number("limitBytes")
        try:
            with open(log, "rb") as handle:
                data = handle.read()
                tail = number("tailLines")
                if tail is not None:
                    data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
                sent = self._write(request, data, limit)
                while flag("follow") and (limit is None or sent < limit) and not self.stopping.is_set():
                    chunk = handle.read()
                    if chunk:
                        sent += self._write(request, chunk, None if limit is None else limit - sent)
                        continue
                    if not self.running(namespace, pod, container):
                        sent += self._write(request, handle.read(), None if limit is None else limit - sent)
                        break
                    time.sleep(FOLLOW_POLL_SECONDS)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return  # the reader went away (kubectl logs -f interrupted)

    @staticmethod
    def _write(request: http.server.BaseHTTPRequestHandler, data: bytes, limit: int | None) -> int:
        if limit is not None:
            data = data[: max(0, limit)]
        if data:
            request.wfile.write(data)
            request.wfile.flush()
        return len(data)

    @staticmethod
    def _error(request: http.server.BaseHTTPRequestHandler, code: int, message: str) -> None:
        body = message.encode()
        request.send_response(code)
        request.send_header("Content-Type", "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
