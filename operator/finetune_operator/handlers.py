"""The operator's watches: kopf's of FineTuneJobs and Kueue's Workloads, our own of Jobs and Pods.

The handlers do no work of their own.  Indexes keep slim copies (``cache``) of FineTuneJobs, of the Jobs
and of the Pods the operator made (labelled ``managed-by: finetune-operator``), filed under the
FineTuneJob name they carry; the reconciler uses only those whose owner reference names the
FineTuneJob's (or its Job's) uid.  Jobs and Pods are watched by ``watches.Informer`` with a
server-side label selector (kopf would list and watch every pod and Job in the cluster and
filter in the client), listed before the reconciler starts, so the first reconcile already sees
every Job and Pod that existed when the operator started: a restart adopts, never duplicates.

Only event handlers are used: kopf then keeps no state of its own on our objects
(no annotations, no finalizers, no ``status.kopf``), so it never fights the status
the reconciler writes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from finetune_api.contract import LABEL_MANAGED_BY, MANAGED_BY
from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION
from finetune_operator import watches
from finetune_operator.cache import owner_key, owning_job, slim_finetunejob, slim_job, slim_pod, slim_workload
from finetune_operator.queueing import WORKLOAD_GROUP, WORKLOAD_VERSION
from finetune_operator.reconciler import Reconciler
from finetune_operator.watches import Informer

OWNED = {LABEL_MANAGED_BY: MANAGED_BY}


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps a "diff base" (a deep copy of each object's spec and metadata) to detect
    changes for on-create/on-update handlers, and builds it for every event even when, as here,
    no such handler exists.  For thousands of pods that copying was the operator's largest CPU
    cost; with only event and index handlers there is nothing to diff."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def owned_informers(reconciler: Reconciler) -> tuple[Informer, Informer]:
    """Watches of the Jobs and the Pods labelled as ours, in the namespaces the operator serves.
    Each object is filed under the FineTuneJob it names (and a Job also under its own name);
    any change wakes that FineTuneJob's reconcile."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # Names only (settings refuses kopf's patterns): the same namespaces kopf watches.
    namespaces = reconciler.settings.namespaces

    def job_owner(namespace: str | None, body: dict[str, Any]) -> Any:
        key = owner_key(namespace, body)
        return (namespace, body["metadata"]["name"]) if key else None

    jobs = Informer(
        reconciler.api,
        "/apis/batch/v1/jobs",
        selector,
        slim=slim_job,
        indexes={"ftj_jobs": owner_key, "ftj_job_owners": job_owner},
        values={"ftj_job_owners": lambda namespace, body: (owner_key(namespace, body) or ("", ""))[1]},
        on_change=reconciler.enqueue,
        namespaces=namespaces,
    )
    pods = Informer(
        reconciler.api,
        "/api/v1/pods",
        selector,
        slim=slim_pod,
        indexes={"ftj_pods": owner_key},
        on_change=reconciler.enqueue,
        namespaces=namespaces,
    )
    return jobs, pods


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    watching: list[asyncio.Task[None]] = []

    @kopf.index(GROUP, VERSION, PLURAL, id="ftj_bodies", registry=registry)
    async def ftj_bodies(*, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): slim_finetunejob(body)}

    # Kueue's Workloads, filed under their Job's name.  Served when Kueue's API exists at the
    # operator's start (kopf scans the API once): install Kueue first, or restart the operator.
    @kopf.index(WORKLOAD_GROUP, WORKLOAD_VERSION, "workloads", id="ftj_workloads", registry=registry)
    async def ftj_workloads(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
        job = owning_job(body)
        return {(namespace, job): slim_workload(body)} if job and namespace else None

    @kopf.on.startup(registry=registry)
    async def bind(*, settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.peering.standalone = True
        settings.posting.enabled = False
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60
        settings.persistence.diffbase_storage = NoDiffBase()
        # kopf keeps a worker per object alive this long after its last event, holding that
        # event's whole body; our handlers only enqueue, so an idle worker is pure memory. At
        # 1,000 jobs (3,000 objects in one burst) 5 s (the default) meant ~40 MB more peak RSS.
        settings.queueing.idle_timeout = 0.5
        # Our Jobs and Pods, filtered by the apiserver; kopf's indexes arrive as kwargs named
        # after their functions.  The reconciler starts once our watches have listed what
        # exists (so a restart adopts, never duplicates); until then keys wait in its queue.
        # Not awaited here: kopf logs in (our API calls wait for that) after startup.
        jobs, pods = owned_informers(reconciler)
        reconciler.bind(
            ftjs=kwargs["ftj_bodies"],
            jobs=jobs["ftj_jobs"],
            pods=pods["ftj_pods"],
            workloads=kwargs["ftj_workloads"],
            job_owners=jobs["ftj_job_owners"],
        )
        watching.extend(watches.start([jobs, pods]))

        async def start_when_listed() -> None:
            await watches.listed([jobs, pods])
            reconciler.start()

        watching.append(asyncio.create_task(start_when_listed(), name="start-reconciler"))

    @kopf.on.cleanup(registry=registry)
    async def unwatch(**_: Any) -> None:
        for task in watching:
            task.cancel()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_changed(
        *, type: str | None, namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> None:
        if not namespace:
            return
        if type == "MODIFIED":
            # Most changes of a running job are our own status writes: those are not news.
            reconciler.changed((namespace, name), body)
        else:
            reconciler.enqueue((namespace, name))

    @kopf.on.event(WORKLOAD_GROUP, WORKLOAD_VERSION, "workloads", registry=registry)
    async def workload_changed(*, namespace: str | None, body: kopf.Body, **_: Any) -> None:
        job = owning_job(body)
        key = reconciler.cache.owner_of_job(namespace, job) if namespace and job else None
        if key:
            reconciler.enqueue(key)

    return registry
