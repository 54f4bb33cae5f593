"""Leader election on a coordination.k8s.io Lease, so that two replicas never both act.

Every replica watches and keeps its caches warm; only the holder of the Lease
reconciles and accepts progress reports (followers report not-ready, so the
Service sends trainers to the leader).  A leader that cannot renew in time stops:
the process exits and its replacement starts as a follower, which is simpler and
safer than trying to hand work back mid-flight.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from finetune_operator.kubeapi import ApiError, KubeAPI
from finetune_operator.timestamps import parse_rfc3339

LOG = logging.getLogger("finetune_operator.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    def __init__(
        self,
        api: KubeAPI,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._leader = False
        self._last_renew: dt.datetime | None = None

    def is_leader(self) -> bool:
        if not self._leader or self._last_renew is None:
            return False
        # Stop acting before the lease can expire under us.
        return (_now() - self._last_renew).total_seconds() < self.lease_seconds - 1

    async def _try(self) -> bool:
        lease = await self.api.read_lease(self.namespace, self.name)
        stamp = _now()
        renew = stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.lease_seconds,
                    "acquireTime": renew,
                    "renewTime": renew,
                    "leaseTransitions": 0,
                },
            }
            try:
                await self.api.create_lease(self.namespace, body)
            except ApiError as exc:
                if exc.status == 409:
                    return False
                raise
            return True
        spec = lease.setdefault("spec", {})
        holder = spec.get("holderIdentity")
        renewed = parse_rfc3339(spec.get("renewTime"))
        duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        expired = renewed is None or (stamp - renewed).total_seconds() > duration
        if holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec["acquireTime"] = renew
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec.update({"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds, "renewTime": renew})
        try:
            # The resourceVersion in the body makes this a compare-and-swap.
            await self.api.replace_lease(self.namespace, self.name, lease)
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        if not self._leader:
            return
        self._leader = False
        lease = await self.api.read_lease(self.namespace, self.name)
        if lease is None or lease.get("spec", {}).get("holderIdentity") != self.identity:
            return
        lease["spec"]["holderIdentity"] = None
        lease["spec"]["renewTime"] = None
        try:
            await self.api.replace_lease(self.namespace, self.name, lease)
            LOG.info("event=leader-released lease=%s/%s identity=%s", self.namespace, self.name, self.identity)
        except ApiError as exc:
            LOG.warning("event=lease-release-failed lease=%s/%s status=%s", self.namespace, self.name, exc.status)

    async def run(self, *, on_started_leading: Callable[[], None], on_lost: Callable[[], None]) -> None:
        while True:
            try:
                acquired = await self._try()
            except Exception as exc:
                LOG.warning("event=lease-error lease=%s/%s error=%r", self.namespace, self.name, exc)
                acquired = False
            if acquired:
                self._last_renew = _now()
                if not self._leader:
                    self._leader = True
                    LOG.info("event=leader-elected lease=%s/%s identity=%s", self.namespace, self.name, self.identity)
                    on_started_leading()
            elif self._leader and not self.is_leader():
                LOG.error("event=leader-lost lease=%s/%s identity=%s", self.namespace, self.name, self.identity)
                self._leader = False
                on_lost()
                return
            await asyncio.sleep(self.renew_seconds)
