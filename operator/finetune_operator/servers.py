"""The operator's HTTP endpoints: progress reports from trainers, /metrics, and health probes.

Progress: ``POST /v1alpha1/namespaces/{ns}/finetunejobs/{name}/progress`` with
``Authorization: Bearer <token>``, the service-account token projected into the trainer pod
for the operator's audience (see ``render``; who may report is ``tokens``' business).  The
server answers quickly and never makes the trainer wait for a status write: it validates,
keeps the newest report, and the reconciler patches the status on its own schedule.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from finetune_api.redact import redact
from finetune_api.report import MAX_REPORT_BYTES, ProgressEvent, ProgressReply
from finetune_operator import names, requests
from finetune_operator.kubeapi import ApiError, describe_error
from finetune_operator.metrics import Metrics, prometheus_text
from finetune_operator.reconciler import Reconciler
from finetune_operator.report_rate import ReportRate
from finetune_operator.reports import ProgressStore, check_report
from finetune_operator.settings import OperatorSettings
from finetune_operator.tokens import TokenGate, Verdict, peek_claims

LOG = logging.getLogger("finetune_operator.servers")
PROGRESS_ROUTE = "/v1alpha1/namespaces/{namespace}/finetunejobs/{name}/progress"


@dataclass
class Health:
    started: bool = False
    watching: bool = False

    def live(self) -> bool:
        return self.started


class ProgressHandler:
    """``POST .../progress``.  Everything that costs nothing is checked before anything that
    costs the apiserver a call (see ``tokens``); the report itself is checked last."""

    def __init__(
        self,
        *,
        reconciler: Reconciler,
        store: ProgressStore,
        gate: TokenGate,
        metrics: Metrics | None,
        is_leader: Callable[[], bool],
        rate: ReportRate | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.store = store
        self.gate = gate
        self.metrics = metrics
        self.is_leader = is_leader
        self.rate = rate or ReportRate()

    def _reject(self, status: int, reason: str, message: str, *, retry_after: int | None = None) -> web.Response:
        if self.metrics:
            self.metrics.reports.labels("rejected", reason).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return web.json_response({"error": reason, "message": message}, status=status, headers=headers)

    async def post(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        name = request.match_info["name"]
        if not self.is_leader():
            return web.json_response({"error": "NotLeader"}, status=503, headers={"Retry-After": "2"})
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.startswith("Bearer ") else ""
        if not token:
            return self._reject(401, "Unauthenticated", "send Authorization: Bearer <the pod's report token>")
        if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        key = (namespace, name)
        # Whether the FineTuneJob exists is never said before the token is checked: a job that
        # is not watched here answers as a watched job answers a token that is not its pod's.
        claims = peek_claims(token)
        if (
            claims is None
            or claims.namespace != namespace
            or self.gate.audience not in claims.audiences
            or claims.expires < time.time()
        ):
            return self._reject(403, "Forbidden", "the token is not a valid report token of a trainer pod")
        pods = self.reconciler.current_pods(key) if self.reconciler.ftj(key) is not None else []
        pod = next((p for p in pods if p["metadata"].get("uid") == claims.pod_uid), None)
        if pod is None:
            # The Job controller names its pods JOB-xxxxx: one we have not seen may be new.
            ours = re.fullmatch(rf"{re.escape(names.job_name(name))}-[a-z0-9]{{5}}", claims.pod_name)
            seen = any(p["metadata"].get("uid") == claims.pod_uid for p in self.reconciler.pods_filed(key))
            if ours and not seen and all(p["metadata"].get("name") != claims.pod_name for p in pods):
                # Perhaps a pod the watch has not shown us yet: the trainer asks again shortly.
                return self._reject(503, "UnknownPod", "the reporting pod is not known yet", retry_after=2)
            return self._reject(403, "Forbidden", "the token belongs to a pod that is not this job's")
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return self._reject(409, "Finished", "the pod has finished: its termination message is the record")

        try:
            outcome = await self.gate.check(token, claims)
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            LOG.warning(
                "event=token-review-failed namespace=%s name=%s error=%s",
                namespace,
                name,
                json.dumps(describe_error(exc)),
            )
            return web.json_response({"error": "ReviewFailed"}, status=503, headers={"Retry-After": "2"})
        if outcome.verdict == Verdict.THROTTLED:
            return self._reject(429, "Throttled", "too many token checks for this pod; try again", retry_after=2)
        if outcome.reporter is None:
            return self._reject(403, "Forbidden", "the token is not a valid report token of a trainer pod")
        reporter = outcome.reporter
        wait = self.rate.allow(key)
        if wait is not None:
            return self._reject(
                429,
                "Throttled",
                f"this job reports faster than {self.rate.per_second:g} a second: wait and send the newest",
                retry_after=max(1, math.ceil(wait)),
            )

        if (request.content_length or 0) > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        try:
            raw = await _read_at_most(request.content, MAX_REPORT_BYTES + 1)
        except ValueError:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        if len(raw) > MAX_REPORT_BYTES:
            return self._reject(413, "TooLarge", f"a report is at most {MAX_REPORT_BYTES} bytes")
        try:
            event = ProgressEvent.model_validate(json.loads(raw))
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                return self._reject(400, "Invalid", redact(str(exc))[:500])
            return self._reject(422, "Invalid", f"the report is not JSON: {exc}"[:500])
        if event.attempt != reporter.pod_name:
            return self._reject(
                403,
                "WrongAttempt",
                f"attempt {event.attempt!r} is not the reporting pod ({reporter.pod_name}): "
                "a pod reports its own attempt",
            )
        problem = check_report(event)
        if problem is not None:
            return self._reject(400, problem.reason, problem.message)
        if self.reconciler.is_final(key):
            return self._reject(409, "Finished", "the job is final: its termination message is the record")
        accepted = self.store.accept(key, event)
        if self.metrics:
            self.metrics.reports.labels("accepted" if accepted else "stale", "").inc()
        # A person's save/sample/stop requests reach the trainer here (see ``requests``).
        body = self.reconciler.ftj(key) or {}
        reply = ProgressReply(accepted=accepted, requests=requests.waiting(body))
        return web.json_response(reply.model_dump(mode="json"), status=202)


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


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, up to ``limit`` bytes: one read returns what has arrived so far, which for a
    large report is a part of it."""
    raw = bytearray()
    while len(raw) < limit:
        chunk = await stream.read(limit - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)
