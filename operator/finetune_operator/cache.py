"""What the operator keeps of the objects it watches, and the lookups the reconciler makes.

Four indexes, each a mapping of key -> slim copies (kopf's indexes for FineTuneJobs and Kueue's
Workloads, ``watches.Informer`` for Jobs and Pods): FineTuneJobs under their own key, Jobs and
Pods under the FineTuneJob name they carry in an annotation, Workloads under their Job's name.
An annotation is only a filing key, which anyone can write: whether a Job or a Pod is really a
FineTuneJob's is decided here, by the uid in its controlling owner reference.

The slim copies share sub-dicts with the event's parsed JSON instead of copying them: each
watch event is parsed afresh and nothing mutates it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_api.contract import ANNOTATION_FULL_NAME, REQUEST_ANNOTATIONS
from finetune_operator import queueing

Key = tuple[str, str]  # a FineTuneJob's (namespace, name)
Index = Mapping[Any, Any]  # key -> the values filed under it (kopf's indexes answer this way)


# --- the slim copies -----------------------------------------------------------------------------


def _meta(body: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {k: meta[k] for k in keys if k in meta}


def slim_finetunejob(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = _meta(
        body, "name", "namespace", "uid", "generation", "resourceVersion", "creationTimestamp", "deletionTimestamp"
    )
    # Of the annotations, only a person's requests to the running job (see ``requests``).
    annotations = body.get("metadata", {}).get("annotations") or {}
    asked = {k: v for k, v in annotations.items() if k in REQUEST_ANNOTATIONS.values()}
    if asked:
        metadata["annotations"] = asked
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": metadata,
        "spec": dict(body.get("spec", {})),
        "status": dict(body.get("status", {})),
    }


def _controller(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The controlling owner reference alone: owners are matched by uid."""
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return [{k: ref.get(k) for k in ("kind", "name", "uid", "controller")} for ref in refs if ref.get("controller")]


def slim_job(body: Mapping[str, Any]) -> dict[str, Any]:
    spec = body.get("spec", {})
    return {
        "metadata": {
            **_meta(body, "name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"),
            "ownerReferences": _controller(body),
        },
        "spec": {k: spec[k] for k in ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished") if k in spec},
        "status": dict(body.get("status", {})),
    }


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    status = body.get("status", {})
    return {
        "metadata": {
            **_meta(body, "name", "namespace", "uid", "creationTimestamp", "deletionTimestamp"),
            "ownerReferences": _controller(body),
        },
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
        "status": {
            k: status[k]
            for k in ("phase", "reason", "message", "conditions", "containerStatuses", "startTime")
            if k in status
        },
    }


def slim_workload(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the status needs of a Kueue Workload: its owner, ``active``, conditions, ClusterQueue."""
    spec, status = body.get("spec", {}), body.get("status", {})
    admission = status.get("admission") or {}
    return {
        "metadata": {
            **_meta(body, "name", "namespace", "uid", "creationTimestamp"),
            "ownerReferences": [
                {k: ref.get(k) for k in ("kind", "name", "uid")}
                for ref in body.get("metadata", {}).get("ownerReferences") or []
            ],
        },
        "spec": {k: spec[k] for k in ("active", "queueName") if k in spec},
        "status": {
            "conditions": list(status.get("conditions") or []),
            **({"admission": {"clusterQueue": admission.get("clusterQueue")}} if admission else {}),
        },
    }


# --- the keys ------------------------------------------------------------------------------------


def owner_key(namespace: str | None, body: Mapping[str, Any]) -> Key | None:
    """The FineTuneJob an object is filed under, by the name it carries.  Only a key: whether
    the object is really that FineTuneJob's (its owner's uid) the lookups below decide."""
    name = body.get("metadata", {}).get("annotations", {}).get(ANNOTATION_FULL_NAME)
    if not name or not namespace:
        return None
    return (namespace, name)


def owning_job(body: Mapping[str, Any]) -> str | None:
    """The name of the batch/v1 Job a Workload belongs to (Kueue makes one per Job)."""
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/"):
            return str(ref.get("name"))
    return None


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controlling owner (a Job's FineTuneJob, a Pod's Job)."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "") or None
    return None


def resource_version(obj: Mapping[str, Any]) -> int:
    """The object's resourceVersion as a number (0 when it has none), to tell newer from older."""
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _values(index: Index | None, key: Any) -> list[dict[str, Any]]:
    if index is None:
        return []
    try:
        return list(index.get(key, []))
    except KeyError:
        return []


# --- the lookups ---------------------------------------------------------------------------------


class Cache:
    """The indexes, read as FineTuneJobs and what they own.  Empty until ``bind``."""

    def __init__(self) -> None:
        self.ftjs: Index | None = None
        self.jobs: Index | None = None
        self.pods: Index | None = None
        self.workloads: Index | None = None
        self.job_owners: Index | None = None

    def bind(
        self,
        *,
        ftjs: Index,
        jobs: Index,
        pods: Index,
        workloads: Index | None = None,
        job_owners: Index | None = None,
    ) -> None:
        self.ftjs, self.jobs, self.pods = ftjs, jobs, pods
        self.workloads, self.job_owners = workloads, job_owners

    def keys(self) -> list[Key]:
        return list(self.ftjs.keys()) if self.ftjs is not None else []

    def ftj(self, key: Key) -> dict[str, Any] | None:
        values = _values(self.ftjs, key)
        return values[0] if values else None

    def has_jobs(self, key: Key) -> bool:
        """Whether any Job is filed under the FineTuneJob ``key``, its own or not."""
        return bool(_values(self.jobs, key))

    def our_job(self, key: Key, uid: str) -> dict[str, Any] | None:
        """The Job of the FineTuneJob with ``uid``, by its owner reference: a Job that only
        carries the name (an earlier FineTuneJob's, orphaned or not yet collected) is not it."""
        return next((j for j in _values(self.jobs, key) if controller_uid(j) == uid), None)

    def pods_of_job(self, key: Key, job: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """The pods the Job ``job`` owns (by its uid; an annotation any pod can carry)."""
        job_uid = (job or {}).get("metadata", {}).get("uid")
        if not job_uid:
            return []
        return [p for p in _values(self.pods, key) if controller_uid(p) == job_uid]

    def pods_filed(self, key: Key) -> list[dict[str, Any]]:
        """Every pod that carries the FineTuneJob's name, its own or not."""
        return _values(self.pods, key)

    def current_pods(self, key: Key) -> list[dict[str, Any]]:
        """The pods of the current Job of the FineTuneJob ``key`` (those that may report)."""
        uid = (self.ftj(key) or {}).get("metadata", {}).get("uid")
        if not uid:
            return []
        return self.pods_of_job(key, self.our_job(key, uid))

    def owner_of_job(self, namespace: str, job_name: str) -> Key | None:
        """The FineTuneJob whose Job is ``namespace/job_name`` (Kueue's Workloads name only the Job)."""
        names = _values(self.job_owners, (namespace, job_name))
        return (namespace, str(names[0])) if names else None

    def workload_of(self, namespace: str, job: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Kueue's Workload of ``job``, if Kueue made one."""
        if job is None:
            return None
        filed = _values(self.workloads, (namespace, job.get("metadata", {}).get("name")))
        return queueing.workload_of(job, filed)
