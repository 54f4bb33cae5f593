"""A read-only web page of the FineTuneJobs the operator watches: phase, a progress bar, ETA,
a loss sparkline and the newest sample thumbnails; one page per job with the whole loss curve
and its Events.

Everything comes from what the operator already holds (its caches and the newest progress
report of each job) plus one Events list per job page.  No write actions, no Secrets; the
pages fill themselves from JSON with ``textContent``, so nothing a user typed (a prompt, a
message) is ever parsed as HTML.

Who sees what is Kubernetes' decision (``WebAccess``): every API request carries a bearer
token, the apiserver says whose it is (a TokenReview) and whether they may ``list
finetunejobs`` in the namespace asked (a SubjectAccessReview; with no ``?namespace=``, in all
namespaces).  The HTML and script carry no data and need no token.  With ``--web-audience``
(the chart's finetune-web) the token must be minted for the page's own audience, so one given
to the page, or read off its plain-HTTP port, is no use against the apiserver itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from finetune_api.redact import redact
from finetune_api.v1alpha1 import GROUP, PLURAL, Phase
from finetune_operator.kubeapi import ApiError, KubeAPI
from finetune_operator.metrics import Metrics
from finetune_operator.reconciler import Reconciler
from finetune_operator.reports import ProgressStore
from finetune_operator.tokens import TokenGate

SPARKLINE_POINTS = 60


def _static(name: str) -> str:
    return resources.files("finetune_operator").joinpath("web", name).read_text()


def _sparkline(points: list[tuple[int, float]]) -> list[float]:
    if len(points) <= SPARKLINE_POINTS:
        return [loss for _, loss in points]
    stride = len(points) / SPARKLINE_POINTS
    return [points[int(i * stride)][1] for i in range(SPARKLINE_POINTS - 1)] + [points[-1][1]]


class Access(StrEnum):
    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    THROTTLED = "throttled"


@dataclass(frozen=True)
class Identity:
    user: dict[str, Any] | None
    until: float


class WebAccess:
    """Bearer token -> may its holder list FineTuneJobs in a namespace?  Asked of the apiserver
    (TokenReview, then SubjectAccessReview) and remembered for ``seconds``.

    Reviews go over the API client's review pool; at most ``max_concurrent`` at once, and about
    ``rate`` a second for each caller (its address: a person sends one token, not thousands):
    beyond that the answer is 429.  One caller sending token after token uses up its own
    allowance, not everyone's; a token already reviewed costs nothing while it is remembered."""

    def __init__(
        self,
        api: KubeAPI,
        *,
        metrics: Metrics | None = None,
        seconds: float = 30.0,
        max_concurrent: int = 4,
        rate: float = 5.0,
        burst: float = 20.0,
        max_remembered: int = 10000,
        audience: str = "",
    ) -> None:
        self.api = api
        self.metrics = metrics
        # The audience a token must be for ("": the apiserver's own, a person's kubeconfig token).
        self.audience = audience
        self.seconds = seconds
        self.max_concurrent = max_concurrent
        self.rate = rate
        self.burst = burst
        self.max_remembered = max_remembered
        self._identities: OrderedDict[str, Identity] = OrderedDict()
        self._decisions: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._in_flight = 0
        # caller -> (reviews it may ask for now, when that was worked out)
        self._allowances: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _take(self, caller: str) -> bool:
        if self._in_flight >= self.max_concurrent:
            return False
        now = time.monotonic()
        allowance, then = self._allowances.get(caller, (self.burst, now))
        allowance = min(self.burst, allowance + (now - then) * self.rate)
        taken = allowance >= 1
        self._remember(self._allowances, caller, (allowance - 1 if taken else allowance, now), self.max_remembered)
        return taken

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.token_reviews.labels("web", result).inc()

    @staticmethod
    def _remember(table: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > limit:
            table.popitem(last=False)

    async def _identity(self, token: str, digest: str, caller: str) -> Identity | None:
        now = time.monotonic()
        known = self._identities.get(digest)
        if known is not None and known.until > now:
            return known
        if not self._take(caller):
            return None
        self._in_flight += 1
        try:
            status = await self.api.review_token(token, audience=self.audience or None)
        finally:
            self._in_flight -= 1
        user = status.get("user") if status.get("authenticated") else None
        self._count("token-accepted" if user else "token-refused")
        identity = Identity(user=dict(user) if isinstance(user, dict) else None, until=now + self.seconds)
        self._remember(self._identities, digest, identity, self.max_remembered)
        return identity

    async def check(self, token: str, namespace: str, *, caller: str = "") -> Access:
        """Whether the bearer of ``token`` may list FineTuneJobs in ``namespace`` ("" = all);
        ``caller``: who asks (its address), whose allowance of reviews this uses."""
        if not token:
            return Access.UNAUTHENTICATED
        digest = TokenGate.digest(token)
        now = time.monotonic()
        decided = self._decisions.get((digest, namespace))
        if decided is not None and decided[1] > now:
            return Access.ALLOWED if decided[0] else Access.FORBIDDEN
        identity = await self._identity(token, digest, caller)
        if identity is None:
            return Access.THROTTLED
        if identity.user is None:
            return Access.UNAUTHENTICATED
        if not self._take(caller):
            return Access.THROTTLED
        self._in_flight += 1
        try:
            status = await self.api.review_access(
                identity.user,
                attributes={"namespace": namespace, "verb": "list", "group": GROUP, "resource": PLURAL},
            )
        finally:
            self._in_flight -= 1
        allowed = bool(status.get("allowed")) and not status.get("denied")
        self._count("access-allowed" if allowed else "access-denied")
        self._remember(self._decisions, (digest, namespace), (allowed, now + self.seconds), self.max_remembered)
        return Access.ALLOWED if allowed else Access.FORBIDDEN


class WebPage:
    def __init__(self, reconciler: Reconciler, store: ProgressStore, api: KubeAPI, access: WebAccess) -> None:
        self.reconciler = reconciler
        self.store = store
        self.api = api
        self.access = access
        audience = access.audience
        # What a 401 says: how to get a token the page takes.
        self.sign_in = (
            f"send Authorization: Bearer <token>, a token for audience {audience} of a ServiceAccount that may "
            f"list FineTuneJobs: kubectl -n NAMESPACE create token ACCOUNT --audience {audience}"
            if audience
            else "send Authorization: Bearer <token>: your kubeconfig's, or one from kubectl create token"
        )

    async def _authorize(self, request: web.Request, namespace: str) -> None:
        """Raise the HTTP error a request without the right to list FineTuneJobs in
        ``namespace`` ("" = all namespaces) gets."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.startswith("Bearer ") else ""
        try:
            access = await self.access.check(token, namespace, caller=request.remote or "")
        except (ApiError, aiohttp.ClientError, TimeoutError):
            raise web.HTTPServiceUnavailable(
                text='{"error": "ReviewFailed", "message": "the apiserver did not answer; try again"}',
                content_type="application/json",
                headers={"Retry-After": "2", **_headers()},
            ) from None
        where = f"in namespace {namespace}" if namespace else "in all namespaces (add ?namespace=NAME)"
        if access == Access.UNAUTHENTICATED:
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "Unauthenticated", "message": self.sign_in}),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer", **_headers()},
            )
        if access == Access.THROTTLED:
            raise web.HTTPTooManyRequests(
                text='{"error": "Throttled", "message": "too many token checks; try again"}',
                content_type="application/json",
                headers={"Retry-After": "2", **_headers()},
            )
        if access == Access.FORBIDDEN:
            raise web.HTTPForbidden(
                text=f'{{"error": "Forbidden", "message": "this token may not list finetunejobs {where}"}}',
                content_type="application/json",
                headers=_headers(),
            )

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
            "phase": status.get("phase") or Phase.PENDING,
            "reason": status.get("reason") or "",
            "message": redact(status.get("message") or ""),
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

    def _keys(self, namespace: str) -> list[tuple[str, str]]:
        keys = sorted(self.reconciler.keys())
        return [k for k in keys if not namespace or k[0] == namespace]

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=_static("index.html"), content_type="text/html", headers=_headers())

    async def job_page(self, request: web.Request) -> web.Response:
        return web.Response(text=_static("job.html"), content_type="text/html", headers=_headers())

    async def script(self, request: web.Request) -> web.Response:
        return web.Response(text=_static("auth.js"), content_type="text/javascript", headers=_headers())

    async def jobs(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        await self._authorize(request, namespace)
        items = [s for k in self._keys(namespace) if (s := self._summary(k)) is not None]
        return web.json_response({"items": items}, headers=_headers())

    async def job(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        await self._authorize(request, key[0])
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
        for field in ("usage", "estimate", "evaluation"):
            summary[field] = status.get(field)
        try:
            events = await self.api.list_events(*key)
        except ApiError:
            events = []
        summary["events"] = [
            {
                "type": e.get("type"),
                "reason": e.get("reason"),
                "message": redact(str(e.get("message") or "")),
                "time": e.get("eventTime") or e.get("lastTimestamp"),
            }
            for e in events
        ]
        return web.json_response(summary, headers=_headers())

    async def thumbnail(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        await self._authorize(request, key[0])
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
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def web_app(
    reconciler: Reconciler, store: ProgressStore, api: KubeAPI, *, metrics: Metrics | None = None, audience: str = ""
) -> web.Application:
    page = WebPage(reconciler, store, api, WebAccess(api, metrics=metrics, audience=audience))
    app = web.Application()
    app.router.add_get("/", page.index)
    app.router.add_get("/auth.js", page.script)
    app.router.add_get("/jobs/{namespace}/{name}", page.job_page)
    app.router.add_get("/api/jobs", page.jobs)
    app.router.add_get("/api/jobs/{namespace}/{name}", page.job)
    app.router.add_get("/api/jobs/{namespace}/{name}/thumbnails/{index:\\d+}.jpg", page.thumbnail)
    return app
