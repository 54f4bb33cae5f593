"""The operator's HTTP endpoints: progress reports from trainers, /metrics, and health probes.

Progress: ``POST /v1alpha1/namespaces/{ns}/finetunejobs/{name}/progress`` with
``Authorization: Bearer <token>``, the per-job token from the Secret the operator
created for that job.  The server answers quickly and never makes the trainer wait
for a status write: it validates, keeps the newest report, and the reconciler
patches the status on its own schedule.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from finetune_operator import names
from finetune_operator.api.report import MAX_REPORT_BYTES, ProgressEvent
from finetune_operator.kubeapi import KubeAPI
from finetune_operator.metrics import Metrics, prometheus_text
from finetune_operator.reconciler import Reconciler
from finetune_operator.reports import ProgressStore
from finetune_operator.settings import OperatorSettings

LOG = logging.getLogger("finetune_operator.servers")
PROGRESS_ROUTE = "/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/progress"


@dataclass
class Health:
    started: bool = False
    watching: bool = False

    def live(self) -> bool:
        return self.started


class ProgressHandler:
    def __init__(
        self,
        *,
        reconciler: Reconciler,
        store: ProgressStore,
        api: KubeAPI,
        metrics: Metrics | None,
        is_leader: Callable[[], bool],
    ) -> None:
        self.reconciler = reconciler
        self.store = store
        self.api = api
        self.metrics = metrics
        self.is_leader = is_leader

    def _reject(self, status: int, reason: str, message: str) -> web.Response:
        if self.metrics:
            self.metrics.reports.labels("rejected", reason).inc()
        return web.json_response({"error": reason, "message": message}, status=status)

    async def expected_token(self, namespace: str, name: str, uid: str) -> str | None:
        key = (namespace, name)
        token = self.reconciler.tokens.get(key)
        if token:
            return token
        # After an operator restart the token is only in the job's Secret.
        secret_name = names.secret_name(name)
        try:
            secret = await self.api._call(self.api.core.read_namespaced_secret, secret_name, namespace)
        except Exception:
            return None
        owners = secret.metadata.owner_references or []
        if not any(ref.uid == uid for ref in owners):
            return None
        raw = (secret.data or {}).get("token")
        if not raw:
            return None
        token = base64.b64decode(raw).decode()
        self.reconciler.tokens[key] = token
        return token

    async def post(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        name = request.match_info["name"]
        if not self.is_leader():
            return web.json_response({"error": "NotLeader"}, status=503, headers={"Retry-After": "2"})
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return self._reject(401, "Unauthenticated", "send Authorization: Bearer <the job's report token>")
        if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        key = (namespace, name)
        body = self.reconciler.ftj(key)
        if body is None:
            return self._reject(404, "UnknownJob", f"no FineTuneJob {namespace}/{name} is watched here")
        expected = await self.expected_token(namespace, name, body["metadata"].get("uid", ""))
        given = header[7:].strip()
        if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
            return self._reject(403, "Forbidden", "the token does not belong to this FineTuneJob")
        try:
            raw = await request.content.read(MAX_REPORT_BYTES + 1)
        except ValueError:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        if len(raw) > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        try:
            event = ProgressEvent.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            return self._reject(422, "Invalid", str(exc)[:500])
        accepted = self.store.accept(key, event)
        if self.metrics:
            self.metrics.reports.labels("accepted" if accepted else "stale", "").inc()
        return web.json_response({"accepted": accepted}, status=202)


def progress_app(handler: ProgressHandler) -> web.Application:
    app = web.Application(client_max_size=MAX_REPORT_BYTES + 1024)
    app.router.add_post(PROGRESS_ROUTE, handler.post)
    return app


def metrics_app(metrics: Metrics) -> web.Application:
    async def scrape(_: web.Request) -> web.Response:
        payload, content_type = prometheus_text(metrics)
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


def health_app(health: Health, *, ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": health.live()}, status=200 if health.live() else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok = health.live() and ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(
    app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
    await site.start()
    return runner


def tls_context(settings: OperatorSettings) -> ssl.SSLContext | None:
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def describe(settings: OperatorSettings) -> dict[str, Any]:
    return {
        "progress": f"{settings.bind_address}:{settings.progress_port}",
        "metrics": f"{settings.bind_address}:{settings.metrics_port}",
        "health": f"{settings.bind_address}:{settings.health_port}",
        "tls": bool(settings.tls_cert_file),
    }
