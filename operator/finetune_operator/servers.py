"""The operator's HTTP endpoints: progress reports from trainers, /metrics, and health probes.

Progress: ``POST /v1alpha1/namespaces/{ns}/finetunejobs/{name}/progress`` with
``Authorization: Bearer <token>``, the service-account token projected into the trainer pod
for the operator's audience (see ``render``).  The server answers quickly and never makes the trainer wait
for a status write: it validates, keeps the newest report, and the reconciler
patches the status on its own schedule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from finetune_api.contract import ANNOTATION_FULL_NAME
from finetune_api.report import MAX_REPORT_BYTES, ProgressEvent
from finetune_operator.kubeapi import ApiError, KubeAPI, describe_error
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


@dataclass(frozen=True)
class Reporter:
    """Who a report token belongs to, as the apiserver's TokenReview says."""

    namespace: str
    pod_name: str
    pod_uid: str
    until: float


class ReportAuthenticator:
    """Bearer tokens of trainer pods: projected service-account tokens for the operator's audience,
    bound to a pod.  A token is good for a FineTuneJob when its pod is one of that job's pods.

    TokenReview answers are cached (by the token's hash) for a few minutes, so a trainer's
    reports cost one review, not one each."""

    def __init__(self, api: KubeAPI, reconciler: Reconciler, *, audience: str, cache_seconds: float = 300) -> None:
        self.api = api
        self.reconciler = reconciler
        self.audience = audience
        self.cache_seconds = cache_seconds
        self._cache: dict[str, Reporter] = {}

    async def reporter(self, token: str) -> Reporter | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now:
            return cached
        status = await self.api.review_token(token, audience=self.audience)
        if not status.get("authenticated"):
            return None
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        username = str(user.get("username", ""))
        pod_uid = (extra.get("authentication.kubernetes.io/pod-uid") or [""])[0]
        pod_name = (extra.get("authentication.kubernetes.io/pod-name") or [""])[0]
        if not username.startswith("system:serviceaccount:") or not pod_uid:
            return None
        reporter = Reporter(username.split(":")[2], pod_name, pod_uid, now + self.cache_seconds)
        if len(self._cache) > 20000:
            self._cache = {k: v for k, v in self._cache.items() if v.until > now}
        self._cache[digest] = reporter
        return reporter

    async def belongs(self, reporter: Reporter, key: tuple[str, str]) -> bool:
        if reporter.namespace != key[0]:
            return False
        pods = self.reconciler.pods_of(key)
        if any(p.get("metadata", {}).get("uid") == reporter.pod_uid for p in pods):
            return True
        # The pod may be newer than the operator's cache: ask once.
        pod = await self.api.read_pod(reporter.namespace, reporter.pod_name)
        if pod is None or pod.get("metadata", {}).get("uid") != reporter.pod_uid:
            return False
        return bool(pod["metadata"].get("annotations", {}).get(ANNOTATION_FULL_NAME) == key[1])


class ProgressHandler:
    def __init__(
        self,
        *,
        reconciler: Reconciler,
        store: ProgressStore,
        authenticator: ReportAuthenticator,
        metrics: Metrics | None,
        is_leader: Callable[[], bool],
    ) -> None:
        self.reconciler = reconciler
        self.store = store
        self.authenticator = authenticator
        self.metrics = metrics
        self.is_leader = is_leader

    def _reject(self, status: int, reason: str, message: str) -> web.Response:
        if self.metrics:
            self.metrics.reports.labels("rejected", reason).inc()
        return web.json_response({"error": reason, "message": message}, status=status)

    async def post(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        name = request.match_info["name"]
        if not self.is_leader():
            return web.json_response({"error": "NotLeader"}, status=503, headers={"Retry-After": "2"})
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            return self._reject(401, "Unauthenticated", "send Authorization: Bearer <the pod's report token>")
        if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        key = (namespace, name)
        if self.reconciler.ftj(key) is None:
            return self._reject(404, "UnknownJob", f"no FineTuneJob {namespace}/{name} is watched here")
        try:
            reporter = await self.authenticator.reporter(header[7:].strip())
        except ApiError as exc:
            LOG.warning(
                "event=token-review-failed namespace=%s name=%s error=%s",
                namespace,
                name,
                json.dumps(describe_error(exc)),
            )
            return web.json_response({"error": "ReviewFailed"}, status=503, headers={"Retry-After": "2"})
        if reporter is None:
            return self._reject(403, "Forbidden", "the token is not a valid report token of a trainer pod")
        if not await self.authenticator.belongs(reporter, key):
            return self._reject(403, "Forbidden", "the token belongs to a pod of another job")
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
