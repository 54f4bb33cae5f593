"""The operator's own calls to the Kubernetes API and its watches of its Jobs and Pods (kopf
watches FineTuneJobs and Kueue's Workloads), on aiohttp in the operator's event loop.

It takes the credentials kopf logged in with (a ``kopf.ConnectionInfo``: kubeconfig or the
in-cluster service account), so both speak to one cluster as one identity, and it does not
use the official synchronous client: that client alone costs about 60 MB of memory and a
thread per call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import aiohttp

from finetune_api.redact import redact
from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION
from finetune_operator import __version__

LOG = logging.getLogger("finetune_operator.kubeapi")
USER_AGENT = f"finetune-operator/{__version__}"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    """An answer of the apiserver other than success; ``causes`` are its ``details.causes``
    (``{"field": ..., "message": ...}``), which name the fields of an invalid object."""

    def __init__(self, status: int, reason: str, message: str, causes: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status} {message or reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = list(causes or [])


def describe_error(exc: BaseException) -> str:
    """One line for a log: for an API error, its status and the apiserver's own message."""
    if isinstance(exc, ApiError):
        return redact(f"{exc.status} {exc.message or exc.reason}")
    return redact(f"{type(exc).__name__}: {exc}")


class Outcome(StrEnum):
    CREATED = "created"
    ADOPTED = "adopted"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Ensured:
    outcome: Outcome
    obj: dict[str, Any]


def _collection(obj: dict[str, Any]) -> str:
    """The collection URL path of a namespaced object."""
    group_version = obj["apiVersion"]
    namespace = obj["metadata"]["namespace"]
    plural = {
        "Job": "jobs",
        "ConfigMap": "configmaps",
        "Secret": "secrets",
        "Event": "events",
        "NetworkPolicy": "networkpolicies",
    }[obj["kind"]]
    prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


class KubeAPI:
    """A few typed calls over one aiohttp session; ``configure`` it once kopf has logged in.

    Reviews (TokenReviews and SubjectAccessReviews, which anyone who reaches the progress
    endpoint or the web page can cause) go over a small pool of their own: however many of
    them wait, Job creation and the leader's Lease renewals never queue behind them."""

    REVIEW_CONNECTIONS = 4

    def __init__(self) -> None:
        self._server = ""
        self._session: aiohttp.ClientSession | None = None
        self._review_session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._make_session: Callable[[int, float | None], aiohttp.ClientSession] | None = None
        self._configured = asyncio.Event()
        self._relogin: Callable[[], Awaitable[Any]] | None = None
        self.writes = 0

    @property
    def logged_in(self) -> bool:
        """Whether a login has given it credentials (until then nothing can reach the API)."""
        return self._configured.is_set()

    def configure(self, info: Any, *, relogin: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Use the credentials kopf logged in with (a ``kopf.ConnectionInfo``)."""
        old = (self._session, self._review_session, self._watch_session)
        self._server = str(info.server).rstrip("/")
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **info.as_http_headers()}

        def session(connections: int, timeout: float | None) -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=connections, ssl=info.as_ssl_context()),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=10),
            )

        self._make_session = session
        self._session = session(32, 60)
        self._review_session = session(self.REVIEW_CONNECTIONS, 10)
        self._watch_session = None  # made by the first watch
        self._relogin = relogin
        self._configured.set()
        for stale in old:
            if stale is not None:
                asyncio.get_running_loop().create_task(stale.close())

    async def close(self) -> None:
        for session in (self._session, self._review_session, self._watch_session):
            if session is not None:
                await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        retry_auth: bool = True,
        review: bool = False,
    ) -> dict[str, Any]:
        await asyncio.wait_for(self._configured.wait(), timeout=120)
        session = self._review_session if review else self._session
        assert session is not None
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            self.writes += 1
        async with session.request(method, self._server + path, data=data, headers=headers, params=params) as response:
            text = await response.text()
            if response.status == 401 and retry_auth and self._relogin is not None:
                # A rotated service-account token: log in again, once.
                await self._relogin()
                return await self.request(
                    method, path, body=body, content_type=content_type, params=params, retry_auth=False, review=review
                )
            if response.status >= 400:
                try:
                    status = json.loads(text)
                except ValueError:
                    status = {}
                if not isinstance(status, dict):
                    status = {}
                details = status.get("details") if isinstance(status.get("details"), dict) else {}
                causes = [c for c in (details or {}).get("causes") or [] if isinstance(c, dict)]
                raise ApiError(
                    response.status,
                    str(status.get("reason") or response.reason),
                    str(status.get("message") or text[:300]),
                    causes,
                )
            return json.loads(text) if text else {}

    async def stream(
        self, path: str, *, params: dict[str, str], read_timeout: float, retry_auth: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch (``params`` with ``watch=1``), one JSON object a line, until the
        server ends the stream.  Over a session of its own: a watch holds its connection for
        minutes, with no total timeout, only one between reads."""
        await asyncio.wait_for(self._configured.wait(), timeout=120)
        if self._watch_session is None or self._watch_session.closed:
            assert self._make_session is not None
            self._watch_session = self._make_session(0, None)  # one connection per watch, unlimited
        async with self._watch_session.request(
            "GET", self._server + path, params=params, timeout=aiohttp.ClientTimeout(sock_read=read_timeout)
        ) as response:
            if response.status == 401 and retry_auth and self._relogin is not None:
                await self._relogin()
                async for event in self.stream(path, params=params, read_timeout=read_timeout, retry_auth=False):
                    yield event
                return
            if response.status >= 400:
                text = await response.text()
                try:
                    status = json.loads(text)
                except ValueError:
                    status = {}
                status = status if isinstance(status, dict) else {}
                raise ApiError(response.status, str(status.get("reason") or response.reason), text[:300])
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    # --- owned objects ---------------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any], *, owner_uid: str) -> Ensured:
        """Create ``obj``; if it exists, adopt it when it is ours, report a conflict when not."""
        collection = _collection(obj)
        try:
            return Ensured(Outcome.CREATED, await self.request("POST", collection, body=obj))
        except ApiError as exc:
            if exc.status != 409:
                raise
        existing = await self.request("GET", f"{collection}/{quote(obj['metadata']['name'])}")
        owners = existing.get("metadata", {}).get("ownerReferences") or []
        if any(ref.get("uid") == owner_uid and ref.get("controller") for ref in owners):
            return Ensured(Outcome.ADOPTED, existing)
        return Ensured(Outcome.CONFLICT, existing)

    async def _read(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None where there is none (404)."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs/{quote(name)}")

    async def read_node(self, name: str) -> dict[str, Any] | None:
        return await self._read(f"/api/v1/nodes/{quote(name)}")

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self.request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{quote(namespace)}/jobs/{quote(name)}",
            body=patch,
            content_type=MERGE_PATCH,
        )

    # --- Kueue ------------------------------------------------------------------------------------

    async def patch_workload(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a Kueue Workload (``spec.active``: how a FineTuneJob's suspend reaches Kueue)."""
        await self.request(
            "PATCH",
            f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{quote(namespace)}/workloads/{quote(name)}",
            body=patch,
            content_type=MERGE_PATCH,
        )

    async def pending_workloads(self, namespace: str, queue: str) -> dict[str, Any]:
        """Kueue's pending-workloads (visibility) API: the LocalQueue's waiting Workloads in order."""
        return await self.request(
            "GET",
            f"/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{quote(namespace)}/localqueues/"
            f"{quote(queue)}/pendingworkloads",
        )

    # --- the FineTuneJob -------------------------------------------------------------------------

    async def read_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneJob as the apiserver has it now (None when it is gone)."""
        return await self._read(f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}")

    async def patch_ftj(self, namespace: str, name: str, operations: list[dict[str, Any]]) -> bool:
        """A JSON patch of the FineTuneJob (a request annotation removed); False where the object
        is gone or a ``test`` operation failed (it changed meanwhile)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}"
        try:
            await self.request("PATCH", path, body=operations, content_type=JSON_PATCH)
        except ApiError as exc:
            if exc.status in (404, 409, 422):
                return False
            raise
        return True

    async def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], *, resource_version: str = ""
    ) -> dict[str, Any] | None:
        """Merge-patch ``.status``; None when the object is gone.  With ``resource_version``, only
        that version of the object takes it (409 otherwise)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}/{quote(name)}/status"
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def post_event(
        self,
        involved: dict[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        component: str = "finetune-operator",
        at: dt.datetime | None = None,
    ) -> None:
        """A core/v1 Event on the FineTuneJob (what `kubectl describe ftj` lists), which happened
        ``at`` (now, unless said)."""
        meta = involved["metadata"]
        now = at or dt.datetime.now(dt.UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion") or f"{GROUP}/{VERSION}",
                "kind": involved.get("kind") or "FineTuneJob",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason[:128],
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": f"finetune.dev/{component}",
            "reportingInstance": component,
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "action": reason[:128],
            "count": 1,
        }
        try:
            await self.request("POST", f"/api/v1/namespaces/{quote(meta['namespace'])}/events", body=body)
        except ApiError as exc:
            LOG.warning(
                "event=event-post-failed namespace=%s name=%s error=%s",
                meta["namespace"],
                meta["name"],
                json.dumps(describe_error(exc)),
            )

    async def list_events(self, namespace: str, name: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The Events of one FineTuneJob, oldest first."""
        result = await self.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/events",
            params={
                "fieldSelector": f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
                "limit": str(limit),
            },
        )
        items = list(result.get("items") or [])
        items.sort(key=lambda e: e.get("eventTime") or e.get("lastTimestamp") or "")
        return items

    # --- authentication of trainer reports ---------------------------------------------------------

    async def review_token(self, token: str, *, audience: str | None) -> dict[str, Any]:
        """A TokenReview: who the apiserver says the bearer of ``token`` is.  ``audience`` None:
        the apiserver's own (a person's token, as kubectl sends it)."""
        spec: dict[str, Any] = {"token": token}
        if audience is not None:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        result = await self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body, review=True)
        return dict(result.get("status") or {})

    async def review_access(self, user: dict[str, Any], *, attributes: dict[str, Any]) -> dict[str, Any]:
        """A SubjectAccessReview: whether ``user`` (a TokenReview's ``status.user``) may do
        what ``attributes`` (a ``resourceAttributes``) says."""
        spec: dict[str, Any] = {
            "user": user.get("username", ""),
            "groups": list(user.get("groups") or []),
            "resourceAttributes": attributes,
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        result = await self.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=body, review=True
        )
        return dict(result.get("status") or {})

    # --- leader election -------------------------------------------------------------------------

    def _lease_path(self, namespace: str, name: str = "") -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
        return f"{base}/{quote(name)}" if name else base

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(f"/api/v1/namespaces/{quote(namespace)}/configmaps/{quote(name)}")

    async def write_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Create the ConfigMap, or replace its data (a merge patch: the last writer wins).  Where
        another writer creates it between our patch and our create, patch what they made."""
        path = f"/api/v1/namespaces/{quote(namespace)}/configmaps"

        async def patch() -> None:
            await self.request("PATCH", f"{path}/{quote(name)}", body={"data": data}, content_type=MERGE_PATCH)

        try:
            await patch()
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
            try:
                await self.request("POST", path, body=body)
            except ApiError as created:
                if created.status != 409:
                    raise
                await patch()

    async def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read(self._lease_path(namespace, name))

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", self._lease_path(namespace), body=body)

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", self._lease_path(namespace, name), body=body)
