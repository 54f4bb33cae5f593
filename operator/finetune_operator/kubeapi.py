"""The operator's writes to the Kubernetes API, each one a coroutine.

kopf owns the watches; this module owns every other call.  It wraps the official
synchronous client in a thread pool of its own, so slow calls never stall the
event loop that serves watches, progress reports and probes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_operator.api.v1alpha1 import GROUP, PLURAL, VERSION

LOG = logging.getLogger("finetune_operator.kubeapi")
T = TypeVar("T")
USER_AGENT = "finetune-operator"


def describe_error(exc: BaseException) -> str:
    """One line for a log: for an API error, its status and the apiserver's own message."""
    if isinstance(exc, ApiException):
        message = exc.reason or ""
        try:
            body = json.loads(exc.body or "{}")
            message = body.get("message") or message
        except (TypeError, ValueError):
            pass
        return f"{exc.status} {message}"
    return f"{type(exc).__name__}: {exc}"


class Outcome(StrEnum):
    CREATED = "created"
    ADOPTED = "adopted"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Ensured:
    outcome: Outcome
    obj: dict[str, Any]


def load_client_config(kubeconfig: str = "") -> client.Configuration:
    configuration = client.Configuration()
    try:
        if kubeconfig:
            raise config.ConfigException("a kubeconfig was given")
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig or None, client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    return configuration


class KubeAPI:
    def __init__(self, configuration: client.Configuration, *, threads: int = 16) -> None:
        self.api_client = client.ApiClient(configuration)
        self.api_client.user_agent = USER_AGENT
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kubeapi")
        self.writes = 0

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _plain(self, obj: Any) -> dict[str, Any]:
        data = self.api_client.sanitize_for_serialization(obj)
        return data if isinstance(data, dict) else {}

    # --- owned objects ---------------------------------------------------------------------------

    async def ensure(self, obj: dict[str, Any], *, owner_uid: str) -> Ensured:
        """Create ``obj``; if it exists, adopt it when it is ours, report a conflict when not."""
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        create, read = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Secret": (self.core.create_namespaced_secret, self.core.read_namespaced_secret),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
        }[kind]
        try:
            self.writes += 1
            created = await self._call(create, namespace, obj)
            return Ensured(Outcome.CREATED, self._plain(created))
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self._plain(await self._call(read, name, namespace))
        owners = existing.get("metadata", {}).get("ownerReferences") or []
        if any(ref.get("uid") == owner_uid and ref.get("controller") for ref in owners):
            return Ensured(Outcome.ADOPTED, existing)
        return Ensured(Outcome.CONFLICT, existing)

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self._call(self.batch.read_namespaced_job, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.writes += 1
        await self._call(self.batch.patch_namespaced_job, name, namespace, patch)

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raw = (secret.data or {}).get(key)
        return base64.b64decode(raw).decode() if raw else None

    # --- the FineTuneJob -------------------------------------------------------------------------

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch ``.status``; None when the object is gone."""
        self.writes += 1
        try:
            result = await self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": patch},
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return result if isinstance(result, dict) else None

    async def post_event(
        self,
        involved: dict[str, Any],
        *,
        type: str,
        reason: str,
        message: str,
        component: str = USER_AGENT,
    ) -> None:
        """A core/v1 Event on the FineTuneJob (what `kubectl describe ftj` lists)."""
        meta = involved["metadata"]
        now = dt.datetime.now(dt.UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": involved.get("kind", "FineTuneJob"),
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
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        self.writes += 1
        try:
            await self._call(self.core.create_namespaced_event, meta["namespace"], body)
        except ApiException as exc:
            LOG.warning(
                "event=event-post-failed namespace=%s name=%s status=%s", meta["namespace"], meta["name"], exc.status
            )

    # --- leader election -------------------------------------------------------------------------

    async def read_lease(self, namespace: str, name: str) -> Any | None:
        try:
            return await self._call(self.coordination.read_namespaced_lease, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> Any:
        return await self._call(self.coordination.create_namespaced_lease, namespace, body)

    async def replace_lease(self, namespace: str, name: str, body: Any) -> Any:
        return await self._call(self.coordination.replace_namespaced_lease, name, namespace, body)
