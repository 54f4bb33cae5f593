"""Our own watches of the Jobs and Pods the operator made, filtered by the apiserver.

kopf lists and watches every object of a resource in the cluster and applies a handler's label
filter in the client: every pod and Job of everyone else would be decoded, wrapped and
dropped by the operator, whose CPU and memory then grow with the cluster, not with its own
jobs.  An ``Informer`` here asks for ``labelSelector=app.kubernetes.io/managed-by=...`` instead,
so only our objects ever reach the process, and keeps a slim copy of each, parsed once.

It is the client-go informer's loop, small: LIST (paged) for a resourceVersion, then WATCH from
it with bookmarks; on a dropped stream, WATCH again from the last version seen; on ``410 Gone``
(the version is too old) LIST again and tell the owner of every object that changed or went
meanwhile.  Objects are filed in an ``Index`` under the FineTuneJob they name, which the
reconciler reads like kopf's indexes (a mapping of key -> values).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.kubeapi import ApiError, KubeAPI

LOG = logging.getLogger("finetune_operator.watches")

Key = tuple[str, str]
Slim = Callable[[dict[str, Any]], dict[str, Any]]
File = Callable[[str | None, dict[str, Any]], Any]
PAGE = 500


class Index(Mapping[Any, list[dict[str, Any]]]):
    """Objects filed under a key (a FineTuneJob's namespace and name, or a Job's), each kept once
    by uid: ``index[key]`` is the list of them, as kopf's indexes answer."""

    def __init__(self) -> None:
        self._filed: dict[Any, dict[str, dict[str, Any]]] = {}

    def __getitem__(self, key: Any) -> list[dict[str, Any]]:
        return list(self._filed[key].values())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._filed)

    def __len__(self) -> int:
        return len(self._filed)

    def put(self, key: Any, uid: str, value: dict[str, Any]) -> None:
        self._filed.setdefault(key, {})[uid] = value

    def drop(self, key: Any, uid: str) -> None:
        filed = self._filed.get(key)
        if filed is not None:
            filed.pop(uid, None)
            if not filed:
                del self._filed[key]


@dataclass
class Informer:
    """One resource's objects with a label, in ``namespaces`` (all when empty), kept current.

    ``slim`` makes the copy kept of each object; ``indexes`` file it (a function of its
    namespace and the full object returns the key, or None to leave it out of that index;
    ``values`` may keep something else than the slim copy in an index);
    ``on_change(key)`` is called with the first index's key of every object that came, changed
    or went."""

    api: KubeAPI
    path: str  # e.g. /api/v1/pods (namespaced: /api/v1/namespaces/{ns}/pods)
    label_selector: str
    slim: Slim
    indexes: dict[str, File]
    on_change: Callable[[Any], None]
    # What an index keeps of an object, where not the slim copy (e.g. only a name).
    values: dict[str, File] = field(default_factory=dict)
    namespaces: tuple[str, ...] = ()
    server_timeout: int = 300
    filed: dict[str, Index] = field(init=False)
    synced: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    relists: int = field(init=False, default=0)
    # uid -> (namespace, {index name: key}) of every object held, to un-file it.
    _where: dict[str, tuple[str | None, dict[str, Any]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.filed = {name: Index() for name in self.indexes}

    def __getitem__(self, index: str) -> Index:
        return self.filed[index]

    # --- the store ---------------------------------------------------------------------------

    def _put(self, obj: dict[str, Any]) -> Any:
        meta = obj.get("metadata") or {}
        uid, namespace = meta.get("uid"), meta.get("namespace")
        if not uid:
            return None
        old = self._where.get(uid)
        keys = {name: file(namespace, obj) for name, file in self.indexes.items()}
        slim = self.slim(obj)
        for name, key in keys.items():
            if old is not None and old[1].get(name) not in (None, key):
                self.filed[name].drop(old[1][name], uid)
            if key is not None:
                value = self.values[name](namespace, obj) if name in self.values else slim
                self.filed[name].put(key, uid, value)
        self._where[uid] = (namespace, keys)
        first = next(iter(keys.values()), None)
        return first if first is not None else (next(iter(old[1].values()), None) if old else None)

    def _drop(self, uid: str) -> Any:
        old = self._where.pop(uid, None)
        if old is None:
            return None
        for name, key in old[1].items():
            if key is not None:
                self.filed[name].drop(key, uid)
        return next(iter(old[1].values()), None)

    def _tell(self, key: Any) -> None:
        if key is not None:
            self.on_change(key)

    # --- LIST and WATCH ----------------------------------------------------------------------

    def _paths(self) -> list[str]:
        if not self.namespaces:
            return [self.path]
        prefix, _, plural = self.path.rpartition("/")
        return [f"{prefix}/namespaces/{namespace}/{plural}" for namespace in self.namespaces]

    async def _list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        params = {"labelSelector": self.label_selector, "limit": str(PAGE)}
        while True:
            page = await self.api.request("GET", path, params=params)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            params = {**params, "continue": meta["continue"]}

    async def _relist(self, path: str) -> str:
        """LIST and make the store agree with it; tell the owner of whatever differed."""
        items, version = await self._list(path)
        self.relists += 1
        seen: set[str] = set()
        for obj in items:
            uid = obj.get("metadata", {}).get("uid")
            if not uid:
                continue
            seen.add(uid)
            self._tell(self._put(obj))
        namespace = self._namespace_of(path)
        for uid in [u for u, (ns, _) in self._where.items() if namespace is None or ns == namespace]:
            if uid not in seen:
                self._tell(self._drop(uid))
        return version

    def _namespace_of(self, path: str) -> str | None:
        parts = path.split("/")
        return parts[parts.index("namespaces") + 1] if "namespaces" in parts else None

    async def run(self) -> None:
        """Keep every path's objects current until cancelled; ``synced`` is set once all are listed."""
        paths = self._paths()
        listed = [asyncio.Event() for _ in paths]

        async def all_listed() -> None:
            for event in listed:
                await event.wait()
            self.synced.set()

        waiter = asyncio.create_task(all_listed())
        try:
            await asyncio.gather(*(self._run_path(path, done) for path, done in zip(paths, listed, strict=True)))
        finally:
            waiter.cancel()

    async def _run_path(self, path: str, listed: asyncio.Event) -> None:
        version = ""
        failures = 0
        while True:
            try:
                if not version:
                    version = await self._relist(path)
                    listed.set()
                version = await self._watch(path, version)
                failures = 0
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status == 410:
                    LOG.info("event=watch-expired path=%s", path)
                    version = ""
                    continue
                failures += 1
                LOG.warning("event=watch-failed path=%s status=%s error=%s", path, exc.status, exc.message)
            except Exception as exc:  # a dropped connection, a proxy timeout: watch again
                failures += 1
                LOG.warning("event=watch-failed path=%s error=%r", path, exc)
            if failures:
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)) * (0.5 + random.random()))

    async def _watch(self, path: str, version: str) -> str:
        """Follow changes from ``version`` until the server ends the stream; the last version."""
        params = {
            "watch": "1",
            "labelSelector": self.label_selector,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.server_timeout),
        }
        async for event in self.api.stream(path, params=params, read_timeout=self.server_timeout + 30):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                code = int(obj.get("code") or 500)
                raise ApiError(code, str(obj.get("reason") or ""), str(obj.get("message") or ""))
            version = str(obj.get("metadata", {}).get("resourceVersion") or version)
            if kind in ("ADDED", "MODIFIED"):
                self._tell(self._put(obj))
            elif kind == "DELETED":
                uid = obj.get("metadata", {}).get("uid")
                if uid:
                    self._tell(self._drop(uid))
        return version


def start(informers: list[Informer]) -> list[asyncio.Task[None]]:
    """Run ``informers`` in the background (each retries on its own until cancelled)."""
    return [asyncio.create_task(informer.run(), name=f"watch {informer.path}") for informer in informers]


async def listed(informers: list[Informer]) -> None:
    """Return once each of ``informers`` has listed what exists."""
    await asyncio.gather(*(informer.synced.wait() for informer in informers))
