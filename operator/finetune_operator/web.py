"""A read-only web page of the FineTuneJobs the operator watches: phase, a progress bar, ETA,
a loss sparkline and the newest sample thumbnails; one page per job with the whole loss curve
and its Events.

Everything comes from what the operator already holds (its caches and the newest progress
report of each job) plus one Events list per job page.  No write actions, no Secrets; the
pages fill themselves from JSON with ``textContent``, so nothing a user typed (a prompt, a
message) is ever parsed as HTML.  ``?namespace=NS`` filters, on the pages and the API.
"""

from __future__ import annotations

import base64
import binascii
from importlib import resources
from typing import Any

from aiohttp import web

from finetune_operator.kubeapi import ApiError, KubeAPI
from finetune_operator.reconciler import Reconciler
from finetune_operator.reports import ProgressStore

SPARKLINE_POINTS = 60


def _static(name: str) -> str:
    return resources.files("finetune_operator").joinpath("web", name).read_text()


def _sparkline(points: list[tuple[int, float]]) -> list[float]:
    if len(points) <= SPARKLINE_POINTS:
        return [loss for _, loss in points]
    stride = len(points) / SPARKLINE_POINTS
    return [points[int(i * stride)][1] for i in range(SPARKLINE_POINTS - 1)] + [points[-1][1]]


class WebPage:
    def __init__(self, reconciler: Reconciler, store: ProgressStore, api: KubeAPI) -> None:
        self.reconciler = reconciler
        self.store = store
        self.api = api

    def _summary(self, key: tuple[str, str]) -> dict[str, Any] | None:
        body = self.reconciler.ftj(key)
        if body is None:
            return None
        status = dict(body.get("status") or {})
        progress = dict(status.get("progress") or {})
        event = self.store.latest(key)
        thumbnails = []
        if event is not None:
            thumbnails = [
                {"index": i, "step": t.step, "prompt": t.prompt, "name": t.name} for i, t in enumerate(event.thumbnails)
            ]
        return {
            "namespace": key[0],
            "name": key[1],
            "phase": status.get("phase") or "Pending",
            "reason": status.get("reason") or "",
            "message": status.get("message") or "",
            "step": progress.get("step"),
            "totalSteps": progress.get("totalSteps"),
            "percent": progress.get("percent") or 0,
            "eta": status.get("etaText") or "",
            "loss": progress.get("loss"),
            "stage": progress.get("stage") or "",
            "sparkline": _sparkline(self.store.history(key)),
            "thumbnails": thumbnails,
            "created": body.get("metadata", {}).get("creationTimestamp"),
        }

    def _keys(self, request: web.Request) -> list[tuple[str, str]]:
        namespace = request.query.get("namespace")
        keys = sorted(self.reconciler.keys())
        return [k for k in keys if not namespace or k[0] == namespace]

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=_static("index.html"), content_type="text/html", headers=_headers())

    async def job_page(self, request: web.Request) -> web.Response:
        return web.Response(text=_static("job.html"), content_type="text/html", headers=_headers())

    async def jobs(self, request: web.Request) -> web.Response:
        items = [s for k in self._keys(request) if (s := self._summary(k)) is not None]
        return web.json_response({"items": items}, headers=_headers())

    async def job(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        summary = self._summary(key)
        if summary is None:
            raise web.HTTPNotFound(text="no such FineTuneJob")
        body = self.reconciler.ftj(key) or {}
        status = dict(body.get("status") or {})
        summary["history"] = self.store.history(key)
        summary["checkpoints"] = status.get("checkpoints") or []
        summary["output"] = status.get("output") or {}
        summary["warnings"] = status.get("warnings") or []
        summary["conditions"] = status.get("conditions") or []
        try:
            events = await self.api.list_events(*key)
        except ApiError:
            events = []
        summary["events"] = [
            {
                "type": e.get("type"),
                "reason": e.get("reason"),
                "message": e.get("message"),
                "time": e.get("eventTime") or e.get("lastTimestamp"),
            }
            for e in events
        ]
        return web.json_response(summary, headers=_headers())

    async def thumbnail(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        event = self.store.latest(key)
        index = int(request.match_info["index"])
        if self.reconciler.ftj(key) is None or event is None or not 0 <= index < len(event.thumbnails):
            raise web.HTTPNotFound(text="no such thumbnail")
        try:
            payload = base64.b64decode(event.thumbnails[index].jpeg_base64, validate=True)
        except (binascii.Error, ValueError):
            raise web.HTTPNotFound(text="no such thumbnail") from None
        return web.Response(body=payload, content_type="image/jpeg", headers=_headers())


def _headers() -> dict[str, str]:
    # Read-only pages: nothing from elsewhere may run in them.
    return {
        "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def web_app(reconciler: Reconciler, store: ProgressStore, api: KubeAPI) -> web.Application:
    page = WebPage(reconciler, store, api)
    app = web.Application()
    app.router.add_get("/", page.index)
    app.router.add_get("/jobs/{namespace}/{name}", page.job_page)
    app.router.add_get("/api/jobs", page.jobs)
    app.router.add_get("/api/jobs/{namespace}/{name}", page.job)
    app.router.add_get("/api/jobs/{namespace}/{name}/thumbnails/{index:\\d+}.jpg", page.thumbnail)
    return app
