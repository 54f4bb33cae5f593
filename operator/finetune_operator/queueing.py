"""What Kueue says of a FineTuneJob's Job, in the status's words.  Pure functions.

Kueue admits a Job through a Workload it creates for it (owned by the Job): the Workload's
conditions say whether it waits for quota (``QuotaReserved`` False, with the reason and the
message of Kueue's scheduler), is admitted (``Admitted``), or was evicted (``Evicted``, e.g.
``Preempted`` by a job of higher priority).  While Kueue holds the Job (suspended), these
functions turn that into a phase, a reason and a message carrying Kueue's own words, and
the pending-workloads API's position, when the operator could read it, into ``status.queue``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_api.v1alpha1 import Phase, Reason

WORKLOAD_GROUP = "kueue.x-k8s.io"
WORKLOAD_VERSION = "v1beta2"
VISIBILITY_GROUP = "visibility.kueue.x-k8s.io"
VISIBILITY_VERSION = "v1beta2"

# Evictions that are the FineTuneJob's own doing (runPolicy.suspend deactivates the Workload):
# the status says Suspended, not what Kueue did about it.
OWN_EVICTIONS = {"Deactivated", "InactiveWorkload"}


@dataclass(frozen=True)
class Position:
    """Where a pending Workload stands, as Kueue's pending-workloads API says (1 = next)."""

    local_queue: int
    cluster_queue: int


@dataclass(frozen=True)
class KueueState:
    phase: Phase
    reason: str
    message: str


def condition(workload: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for item in ((workload or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return None


def _true(workload: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    found = condition(workload, kind)
    return found if found is not None and found.get("status") == "True" else None


def workload_of(job: Mapping[str, Any] | None, workloads: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The Workload Kueue made for ``job`` (owned by its uid); the newest if there are several."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    if not uid:
        return None
    owned = [
        dict(w)
        for w in workloads
        if any(ref.get("uid") == uid for ref in (w.get("metadata") or {}).get("ownerReferences") or [])
    ]
    owned.sort(key=lambda w: (w.get("metadata") or {}).get("creationTimestamp") or "")
    return owned[-1] if owned else None


def cluster_queue(workload: Mapping[str, Any] | None) -> str:
    admission = ((workload or {}).get("status") or {}).get("admission") or {}
    return str(admission.get("clusterQueue") or "")


def admitted(workload: Mapping[str, Any] | None) -> bool:
    return _true(workload, "Admitted") is not None


def evicted_by_preemption(workload: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The Evicted condition while a preemption holds the Workload (until quota is reserved again)."""
    evicted = _true(workload, "Evicted")
    return evicted if evicted is not None and evicted.get("reason") == "Preempted" else None


def waiting_for_quota(workload: Mapping[str, Any] | None) -> bool:
    """Whether the Workload is in its queue, waiting for quota: where a position means something."""
    if workload is None or _true(workload, "Finished") or (workload.get("spec") or {}).get("active") is False:
        return False
    return _true(workload, "QuotaReserved") is None


def waiting_since(workload: Mapping[str, Any] | None) -> dt.datetime | None:
    """When the Workload last began to wait for quota (its QuotaReserved condition turned False)."""
    found = condition(workload, "QuotaReserved")
    if found is None or found.get("status") != "False":
        return None
    try:
        return dt.datetime.fromisoformat(str(found.get("lastTransitionTime")).replace("Z", "+00:00"))
    except ValueError:
        return None


def _kueue(message: str) -> str:
    return f"Kueue: {message.strip()}" if message.strip() else "Kueue: no message"


def _where(queue: str, position: Position | None) -> str:
    if position is None:
        return ""
    return f"; position {position.local_queue} in LocalQueue {queue} ({position.cluster_queue} in its ClusterQueue)"


def held(workload: Mapping[str, Any] | None, *, queue: str, position: Position | None = None) -> KueueState:
    """The phase of a FineTuneJob whose Job Kueue holds (suspended), from its Workload."""
    if workload is None:
        return KueueState(
            Phase.QUEUED,
            Reason.WAITING_FOR_ADMISSION,
            f"waiting for Kueue to create the Job's Workload in LocalQueue {queue}; if this lasts, "
            "check that Kueue runs with the batch/job integration",
        )
    pending = condition(workload, "QuotaReserved")
    pending_message = (pending or {}).get("message") or ""
    preempted = evicted_by_preemption(workload)
    if preempted is not None:
        message = f"preempted by Kueue: {preempted.get('message') or 'no message'}"
        if pending is not None and pending.get("status") == "False" and pending_message != preempted.get("message"):
            message += f"; waiting to be admitted again. Kueue: {pending_message}"
        message += "; it continues from its newest checkpoint once admitted again" + _where(queue, position)
        return KueueState(Phase.PREEMPTED, Reason.PREEMPTED, message)
    evicted = _true(workload, "Evicted")
    if evicted is not None and evicted.get("reason") not in OWN_EVICTIONS:
        return KueueState(
            Phase.QUEUED,
            str(evicted.get("reason") or Reason.EVICTED),
            "evicted by " + _kueue(evicted.get("message") or ""),
        )
    if admitted(workload):
        return KueueState(Phase.INITIALIZING, Reason.ADMITTED, admitted_message(workload))
    if pending is not None and pending.get("status") == "True":
        # Quota reserved, admission checks not yet all Ready.
        return KueueState(Phase.QUEUED, Reason.QUOTA_RESERVED, _kueue(pending_message))
    if pending is None:
        return KueueState(
            Phase.QUEUED,
            Reason.PENDING,
            f"Kueue: the Workload {workload.get('metadata', {}).get('name', '')} waits in LocalQueue {queue}"
            + _where(queue, position),
        )
    return KueueState(
        Phase.QUEUED, str(pending.get("reason") or Reason.PENDING), _kueue(pending_message) + _where(queue, position)
    )


def admitted_message(workload: Mapping[str, Any]) -> str:
    found = _true(workload, "Admitted") or {}
    queue = cluster_queue(workload)
    text = f"admitted by Kueue to ClusterQueue {queue}" if queue else "admitted by Kueue"
    said = found.get("message") or ""
    return f"{text} (Kueue: {said})" if said else text


def queue_status(workload: Mapping[str, Any] | None, *, queue: str, position: Position | None) -> dict[str, Any] | None:
    """``status.queue``: the LocalQueue, the Workload, its ClusterQueue and position, as known."""
    if not queue:
        return None
    out: dict[str, Any] = {"name": queue}
    if workload is not None:
        out["workload"] = (workload.get("metadata") or {}).get("name")
        if cluster_queue(workload):
            out["clusterQueue"] = cluster_queue(workload)
    if position is not None and waiting_for_quota(workload):
        out["position"] = position.local_queue
        out["positionInClusterQueue"] = position.cluster_queue
    return out


def position_in(summary: Mapping[str, Any], workload_name: str) -> Position | None:
    """The position of ``workload_name`` in a PendingWorkloadsSummary (Kueue counts from 0)."""
    for item in summary.get("items") or []:
        if (item.get("metadata") or {}).get("name") == workload_name:
            return Position(
                local_queue=int(item.get("positionInLocalQueue") or 0) + 1,
                cluster_queue=int(item.get("positionInClusterQueue") or 0) + 1,
            )
    return None
