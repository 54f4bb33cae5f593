"""The reconcile loop: the one function that moves a FineTuneJob towards what its spec asks,
and the workers that run it.

Watches fill the ``Cache`` (FineTuneJobs, their Jobs, Pods and Workloads) and add the key of the
FineTuneJob an event concerns to a ``WorkQueue``; workers take keys off it, one at a time per key,
and ``reconcile`` them: ensure the owned objects, keep the Job's suspension in step with the
spec, compute the status from what the cache holds and the newest progress report, and patch
only what changed.  New FineTuneJobs (no Job yet) go first: a Job is what a user waits for.

Status writes are throttled per job: a change of phase is written at once, a change of progress
alone at most once per ``status_interval``, always the newest, and a finer reason alone (same
phase), or a step a pod passes in a moment (Scheduling, PodStarting), only once it has held for
``reason_settle``.  The change our own status write makes comes back through the watch; it is
recognised by its resourceVersion and not reconciled again.  Events go out through an
``EventEmitter``, off the reconcile's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_api import job_policy
from finetune_api.redact import redact
from finetune_api.v1alpha1 import (
    EstimateStatus,
    FailureReason,
    FineTuneJob,
    ManifestError,
    Phase,
    Reason,
    parse_manifest,
)
from finetune_operator import names, queueing, requests, speeds, usage
from finetune_operator.cache import Cache, Key, controller_uid, resource_version
from finetune_operator.events import EventEmitter
from finetune_operator.failures import explain_rejection
from finetune_operator.kubeapi import ApiError, KubeAPI, Outcome, describe_error
from finetune_operator.metrics import JobView, Metrics
from finetune_operator.positions import PendingPositions
from finetune_operator.render import ClaimMount, claim_mounts, cluster_problems, render
from finetune_operator.render.egress import egress_policy, parse_denied
from finetune_operator.reports import ProgressStore
from finetune_operator.settings import OperatorSettings
from finetune_operator.status import Observed, compute_status, status_patch, with_phase
from finetune_operator.timestamps import parse_rfc3339
from finetune_operator.workqueue import WorkQueue

LOG = logging.getLogger("finetune_operator.reconciler")
FINAL = {Phase.SUCCEEDED.value, Phase.FAILED.value}
RUNNING_PHASES = {Phase.INITIALIZING.value, Phase.TRAINING.value, Phase.EXPORTING.value}
# Work queue priorities: a FineTuneJob without a Job first.
CREATE, UPDATE = 0, 1
MAX_BACKOFF = 60.0
# A job waiting in a Kueue LocalQueue is looked at again this often: its position changes
# without any change to its own objects.
POSITION_REFRESH = 10.0
POSITION_RETRY = 2.0
# A Job the apiserver refused is tried again after 5 s, 10 s, ... up to this; a change of the
# spec tries at once.
MAX_REJECTED_BACKOFF = 300.0

# The resourceVersions of a job's latest status writes that are remembered: writes a moment
# apart are echoed by the watch after both were sent.
OWN_WRITES_KEPT = 4


# After a status write refused as made against an older object: the watch brings the newer one
# (and its own reconcile) meanwhile; this retry is for the case it does not.
CONFLICT_RETRY = 1.0

# What a pod normally passes through in a moment: written only once it has held (see reconcile).
PASSING = {Reason.SCHEDULING.value, Reason.POD_STARTING.value}

# Fields that change with every report without telling a person anything new.
_NOT_NEWS = {"updateTime", "etaSeconds", "stepsPerSecond", "learningRate", "peakMemoryBytes"}


def _news(patch: dict[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a status patch carries something worth a write (not only a fresher timestamp).

    The ETA's text rides along with the next write, never causes one; so does the Job's start
    time until the Job has a pod: the Job controller stamps it before it makes the pod, and at a
    burst of jobs a write of it alone was one more apiserver write per job while the pods were
    being made."""
    for key, value in patch.items():
        if key == "etaText" or (key == "startTime" and not new.get("attempts")):
            continue
        if key == "progress" and isinstance(value, dict):
            if _progress_news(patch):
                return True
            continue
        return True
    return False


def _progress_news(patch: dict[str, Any]) -> bool:
    """Whether a status patch carries the trainer's progress (a step, a loss), not only a reason."""
    progress = patch.get("progress")
    return isinstance(progress, dict) and bool(set(progress) - _NOT_NEWS)


def _watched(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a FineTuneJob, besides its status, a reconcile acts on: its spec (by generation)
    and its deletion.  The cache keeps none of its labels and annotations: they change nothing."""
    meta = body.get("metadata", {})
    return (meta.get("uid"), meta.get("generation"), meta.get("deletionTimestamp"))


def create_backoff(tries: int) -> float:
    """Seconds before the next try to create a Job after ``tries`` failed in a row: 5 s,
    doubling, at most MAX_REJECTED_BACKOFF."""
    return min(MAX_REJECTED_BACKOFF, 5.0 * 2 ** (tries - 1))


@dataclass
class JobMemory:
    """What the reconciler remembers of one FineTuneJob between reconciles.  ``uid`` says of
    which one: a FineTuneJob deleted and created again under the same name starts afresh."""

    uid: str = ""
    status: dict[str, Any] | None = None
    status_rv: int = 0
    # resourceVersion our status write made -> what the FineTuneJob was when we wrote it
    own_writes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    last_progress_patch: float = float("-inf")
    # When the reconcile first saw a change it has not written yet (the loop's clock).
    news_since: float | None = None
    seen_pods: set[str] = field(default_factory=set)
    # The spec as models, parsed once per generation while the job is active.
    parsed: FineTuneJob | None = None
    stamp: tuple[str, int] = ("", 0)
    gpus: int = 0
    mounts: tuple[ClaimMount, ...] = ()
    created_at: float | None = None
    counted_queue: bool = False
    counted_first_step: bool = False
    rejections: int = 0
    rejected: str = ""
    # Creations that failed for a reason that passes, in a row, and the last error.
    create_failures: int = 0
    create_failing: str = ""
    # After a failed or refused create, no new try before this time (the loop's clock) while the
    # spec is the generation it was: a reconcile for anything else (our own status write's
    # echo, kopf's annotations) waits for the back-off instead of trying again at once.
    create_not_before: float = 0.0
    create_generation: int = 0


class Reconciler:
    def __init__(
        self,
        api: KubeAPI,
        settings: OperatorSettings,
        *,
        progress: ProgressStore,
        metrics: Metrics | None = None,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.api = api
        self.settings = settings
        self.progress = progress
        self.metrics = metrics
        self.is_leader = is_leader
        self.memory: dict[Key, JobMemory] = {}
        self.cache = Cache()
        self.queue: WorkQueue[Key] = WorkQueue(priority=self._priority, max_delay=MAX_BACKOFF)
        self.events = EventEmitter(
            api,
            defer=lambda: self.queue.waiting(priority=CREATE) > 0,
            on_drop=metrics.events_dropped.inc if metrics else lambda: None,
        )
        self.positions = PendingPositions(api)
        # Each node's GPU product (settings.gpu_product_label), read once per node; None: none.
        self._gpu_products: dict[str, str | None] = {}
        self.policy = settings.policy()
        # What trainer pods may not reach (a NetworkPolicy beside each Job); (): none made.
        self.egress_denied = parse_denied(settings.trainer_egress_deny)
        self.prices = usage.Prices(usage.parse_prices(settings.gpu_hour_prices), settings.currency)
        # Finished jobs' speeds (status.estimate), read from their ConfigMap at the first need.
        self.speeds: speeds.SpeedBook | None = None
        # One write of the book at a time, each of the whole book as it is then: the last write
        # holds every job's speed (two jobs that finish together would otherwise race), and jobs
        # that finish while a write is under way share the next one (_speeds_unwritten).
        self._speeds_written = asyncio.Lock()
        self._speeds_unwritten = False
        self._workers: list[asyncio.Task[None]] = []
        self.reconciles = 0
        self.own_writes_skipped = 0
        self.report_ca = ""
        if settings.tls_ca_file:
            from pathlib import Path

            self.report_ca = Path(settings.tls_ca_file).read_text()

    # --- wiring ----------------------------------------------------------------------------------

    def bind(
        self,
        *,
        ftjs: Mapping[Any, Any],
        jobs: Mapping[Any, Any],
        pods: Mapping[Any, Any],
        workloads: Mapping[Any, Any] | None = None,
        job_owners: Mapping[Any, Any] | None = None,
    ) -> None:
        self.cache.bind(ftjs=ftjs, jobs=jobs, pods=pods, workloads=workloads, job_owners=job_owners)

    # The lookups the HTTP servers make.

    def keys(self) -> list[Key]:
        return self.cache.keys()

    def ftj(self, key: Key) -> dict[str, Any] | None:
        return self.cache.ftj(key)

    def current_pods(self, key: Key) -> list[dict[str, Any]]:
        return self.cache.current_pods(key)

    def pods_filed(self, key: Key) -> list[dict[str, Any]]:
        return self.cache.pods_filed(key)

    def is_final(self, key: Key) -> bool:
        body = self.cache.ftj(key)
        if body is None:
            return False
        memory = self.memory.get(key)
        status = self._base_status(body, memory) if memory is not None else dict(body.get("status") or {})
        return status.get("phase") in FINAL

    def start(self) -> None:
        self.events.start()
        for number in range(max(1, self.settings.workers)):
            self._workers.append(asyncio.create_task(self._worker(), name=f"reconcile-worker-{number}"))

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.queue.close()
        await self.events.stop()

    # --- the queue -------------------------------------------------------------------------------

    def enqueue(self, key: Key, *, delay: float = 0.0) -> None:
        """Reconcile ``key`` soon (after ``delay`` seconds); repeated requests coalesce."""
        self.queue.add(key, delay=delay)

    def enqueue_all(self) -> None:
        for key in self.keys():
            self.enqueue(key)

    def changed(self, key: Key, body: Mapping[str, Any]) -> None:
        """A FineTuneJob changed: reconcile it, unless the change is only our own status write."""
        if self.own_write(key, body):
            self.own_writes_skipped += 1
            if self.metrics:
                self.metrics.own_writes_skipped.inc()
            return
        self.enqueue(key)

    def own_write(self, key: Key, body: Mapping[str, Any]) -> bool:
        """Whether ``body`` is the FineTuneJob as our own status write left it: the
        resourceVersion that write returned, over the spec and deletion the reconcile read."""
        memory = self.memory.get(key)
        if memory is None or not memory.own_writes:
            return False
        version = str(body.get("metadata", {}).get("resourceVersion") or "")
        return memory.own_writes.get(version) == _watched(body)

    def _priority(self, key: Key) -> int:
        if self.cache.has_jobs(key):
            return UPDATE
        body = self.cache.ftj(key)
        return CREATE if body is not None and not (body.get("status") or {}).get("jobName") else UPDATE

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                if not self.is_leader():
                    # A follower keeps its caches warm but writes nothing; the new
                    # leader enqueues every key when it takes over.
                    continue
                await self._process(key)
            finally:
                self.queue.done(key)

    async def _process(self, key: Key) -> None:
        started = time.perf_counter()
        try:
            await self.reconcile(key)
            self.queue.forget(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = self.queue.retry(key)
            LOG.warning(
                "event=reconcile-error namespace=%s name=%s retry_in=%.1fs error=%s",
                key[0],
                key[1],
                delay,
                json.dumps(describe_error(exc)),
            )
            if self.metrics:
                self.metrics.reconcile_errors.labels(type(exc).__name__).inc()
        finally:
            self.reconciles += 1
            if self.metrics:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    # --- reconcile -------------------------------------------------------------------------------

    def _parse(self, key: Key, body: dict[str, Any], memory: JobMemory) -> FineTuneJob:
        """The spec as models, parsed once per generation: kept with the job's memory while it
        is active, dropped when it ends or is forgotten."""
        meta = body["metadata"]
        stamp = (meta.get("uid", ""), int(meta.get("generation") or 0))
        if memory.parsed is not None and memory.stamp == stamp:
            return memory.parsed
        job = parse_manifest(
            {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "spec": body.get("spec") or {},
            },
            source=f"{key[0]}/{key[1]}",
        )
        memory.parsed = job
        if memory.stamp != stamp:
            memory.stamp = stamp
            memory.mounts = claim_mounts(job)
            memory.gpus = job.spec.resources.gpus
        return job

    def _base(self, body: dict[str, Any], memory: JobMemory) -> tuple[dict[str, Any], str]:
        """The status as the server has it, and the resourceVersion of the object it belongs to:
        our last write, unless the cache has seen a newer one."""
        newer = memory.status_rv > resource_version(body)
        if memory.status is not None and newer and memory.uid == body["metadata"].get("uid"):
            return dict(memory.status), str(memory.status_rv)
        return dict(body.get("status") or {}), str(body["metadata"].get("resourceVersion") or "")

    def _base_status(self, body: dict[str, Any], memory: JobMemory) -> dict[str, Any]:
        return self._base(body, memory)[0]

    def _memory(self, key: Key, uid: str) -> JobMemory:
        memory = self.memory.get(key)
        if memory is None or memory.uid != uid:
            if memory is not None:
                # The same name, another FineTuneJob: nothing of the earlier one carries over.
                self.forget(key)
            memory = self.memory[key] = JobMemory(uid=uid)
        return memory

    async def reconcile(self, key: Key) -> None:
        namespace, name = key
        body = self.cache.ftj(key)
        if body is None:
            self.forget(key)
            return
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        uid = str(body["metadata"].get("uid") or "")
        memory = self._memory(key, uid)
        if memory.created_at is None:
            memory.created_at = time.time()
        previous = self._base_status(body, memory)
        await self._settle_requests(key, body, previous)
        if previous.get("phase") in FINAL:
            await self._finished(key, body, memory, previous)
            return
        try:
            job_model = self._parse(key, body, memory)
            problems = cluster_problems(job_model) + job_policy.problems(job_model.spec, self.policy)
            if problems:
                raise ManifestError(problems, source=f"{namespace}/{name}")
        except ManifestError as exc:
            message = redact(str(exc))
            await self._write(
                key,
                body,
                memory,
                previous,
                with_phase(previous, Phase.FAILED, FailureReason.INVALID_SPEC, message),
                events=[("Warning", FailureReason.INVALID_SPEC, message)],
                cause="phase",
            )
            return

        job_name = names.job_name(name)
        job = self.cache.our_job(key, uid)
        missing_confirmed = False
        if job is None:
            if previous.get("jobName"):
                # The index may lag behind a Job we just created: ask the API.
                job = await self.api.read_job(namespace, job_name)
                if job is not None and controller_uid(job) != uid:
                    job = None
                missing_confirmed = job is None
            else:
                wait = self._create_wait(body, memory)
                if wait > 0:
                    self.enqueue(key, delay=wait)
                    return
                job = await self._create(key, body, job_model, memory, previous)
                if job is None:
                    return
        else:
            await self._sync_job(key, job, job_model)

        pods = self.cache.pods_of_job(key, job)
        memory.seen_pods.update(p["metadata"]["uid"] for p in pods if p.get("metadata", {}).get("uid"))
        workload, position = await self._kueue(key, job, job_model)
        observed = Observed(
            job=job,
            pods=pods,
            progress=self.progress.latest(key),
            job_missing_confirmed=missing_confirmed,
            seen_pods=len(memory.seen_pods),
            workload=workload,
            position=position,
            gpu_products=await self._products_of(pods),
            estimate=await self._estimate(job_model, previous),
        )
        result = compute_status(
            previous,
            job_model.spec,
            observed,
            generation=body.get("metadata", {}).get("generation"),
            job_name=job_name,
            mounts=memory.mounts,
            prices=self.prices,
        )
        new = result.status
        # A new phase is written at once; anything else (a finer reason, progress) at most once
        # per status interval, always the newest.  What a pod passes through in a moment (waiting
        # for the scheduler, its containers starting) is written only once it has held for
        # ``reason_settle``, a new phase included: a pod placed and running within a second of
        # being made goes Pending/Starting -> Initializing/TrainerStarting in one write, not
        # three, and at a burst of jobs that is up to two status writes per job saved.
        phase_changed = previous.get("phase") != new.get("phase")
        patch = status_patch(previous, new)
        if not patch or not _news(patch, new):
            memory.news_since = None
            self._track_gpu(key, new, memory)
            return
        cause = "phase" if phase_changed else "progress"
        if new.get("phase") not in FINAL:
            now = asyncio.get_running_loop().time()
            if memory.news_since is None:
                memory.news_since = now
            due = now if phase_changed else memory.last_progress_patch + self.settings.status_interval
            if not _progress_news(patch) and (not phase_changed or new.get("reason") in PASSING):
                due = max(due, memory.news_since + self.settings.reason_settle)
            if due > now:
                self.enqueue(key, delay=due - now)
                return
        await self._write(
            key,
            body,
            memory,
            previous,
            new,
            events=[(e.type, e.reason, e.message) for e in result.events],
            cause=cause,
        )
        if new.get("phase") in FINAL:
            await self._settle_requests(key, body, new)
            await self._record_speed(key, job_model, new)
            await self._finished(key, body, memory, new, job=job)

    async def _settle_requests(self, key: Key, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Remove the request annotations the trainer has acted on (and on a final job the rest),
        each with an Event (see ``requests``)."""
        if not requests.waiting(body):
            return
        final = status.get("phase") in FINAL
        for done in requests.settled(body, self.progress.latest(key), final=final, reason=status.get("reason")):
            if await self.api.patch_ftj(key[0], key[1], requests.removal(done)):
                LOG.info(
                    "event=request-settled namespace=%s name=%s annotation=%s reason=%s",
                    key[0],
                    key[1],
                    done.annotation,
                    done.reason,
                )
                self.events.emit(body, type=done.type, reason=done.reason, message=done.message)

    async def _finished(
        self,
        key: Key,
        body: dict[str, Any],
        memory: JobMemory,
        status: dict[str, Any],
        *,
        job: dict[str, Any] | None = None,
    ) -> None:
        """A final status is written: only now may the Job's TTL delete it (with its pods and
        their termination messages, the fallback record of the result), and what is kept of
        the job's reports shrinks to what a finished job shows."""
        self._track_gpu(key, status, memory)
        self.progress.finish(key)
        memory.parsed = None
        ttl = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        job = job or self.cache.our_job(key, memory.uid)
        if job is None or (job.get("spec") or {}).get("ttlSecondsAfterFinished") == ttl:
            return
        LOG.info("event=job-ttl namespace=%s name=%s ttl=%s", key[0], key[1], ttl)
        try:
            await self.api.patch_job(key[0], job["metadata"]["name"], {"spec": {"ttlSecondsAfterFinished": ttl}})
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _kueue(
        self, key: Key, job: dict[str, Any] | None, job_model: FineTuneJob
    ) -> tuple[dict[str, Any] | None, queueing.Position | None]:
        """Kueue's Workload of the Job and, while it waits for quota, its place in the queue."""
        queue = job_model.spec.run_policy.queue_name
        if not queue:
            return None, None
        workload = self.cache.workload_of(key[0], job)
        if not queueing.waiting_for_quota(workload):
            return workload, None
        assert workload is not None
        position = await self.positions.of(key[0], queue, workload["metadata"]["name"])
        # Kueue lists a Workload only between its scheduling attempts: one that has just begun
        # to wait may be missing for a moment, so look again soon, for a while.
        since = queueing.waiting_since(workload)
        young = since is not None and (dt.datetime.now(dt.UTC) - since).total_seconds() < POSITION_REFRESH * 3
        self.enqueue(key, delay=POSITION_REFRESH if position is not None or not young else POSITION_RETRY)
        return workload, position

    async def _write(
        self,
        key: Key,
        body: dict[str, Any],
        memory: JobMemory,
        previous: dict[str, Any],
        new: dict[str, Any],
        *,
        events: Iterable[tuple[str, str, str]],
        cause: str,
    ) -> None:
        namespace, name = key
        patch = status_patch(previous, new)
        # Made against the very object ``previous`` is the status of: a FineTuneJob deleted and
        # made again under the same name (a status write goes by name, and the status
        # subresource ignores a uid in the patch) or changed meanwhile answers 409, never takes
        # a status meant for another.
        version = self._base(body, memory)[1]
        try:
            try:
                result = await self.api.patch_status(namespace, name, patch, resource_version=version)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                # Most often kopf's own change of a new object (its annotations), which the cache
                # has not seen yet: the same object, read again, takes the write at once. Another
                # object of the same name never does.
                current = await self.api.read_ftj(namespace, name)
                same = current is not None and current["metadata"].get("uid") == body["metadata"].get("uid")
                if not same or current is None:
                    raise
                LOG.info("event=status-conflict-reread namespace=%s name=%s read_version=%s", namespace, name, version)
                fresh = str(current["metadata"].get("resourceVersion") or "")
                result = await self.api.patch_status(namespace, name, patch, resource_version=fresh)
        except ApiError as exc:
            if exc.status == 409:
                LOG.info("event=status-conflict namespace=%s name=%s read_version=%s", namespace, name, version)
                self.enqueue(key, delay=CONFLICT_RETRY)
                return
            if self.metrics:
                self.metrics.status_patch_errors.inc()
            raise
        except Exception:
            if self.metrics:
                self.metrics.status_patch_errors.inc()
            raise
        if result is None:
            self.forget(key)
            return
        memory.status = dict(result.get("status") or new)
        memory.status_rv = resource_version(result)
        version = str(result.get("metadata", {}).get("resourceVersion") or "")
        if version:
            memory.own_writes[version] = _watched(body)
            while len(memory.own_writes) > OWN_WRITES_KEPT:
                del memory.own_writes[next(iter(memory.own_writes))]
        memory.last_progress_patch = asyncio.get_running_loop().time()
        memory.news_since = None
        if self.metrics:
            self.metrics.status_patches.labels(cause).inc()
        old_phase, new_phase = previous.get("phase"), new.get("phase")
        LOG.info(
            "event=status namespace=%s name=%s phase=%s reason=%s cause=%s",
            namespace,
            name,
            new_phase,
            new.get("reason"),
            cause,
        )
        for kind, reason, message in events:
            self.events.emit(body, type=kind, reason=reason, message=message)
        first_step = not memory.counted_first_step and (new.get("progress") or {}).get("step")
        if old_phase != new_phase or first_step:
            self._observe_transition(key, body, memory, new)
        self._track_gpu(key, new, memory)

    def _observe_transition(self, key: Key, body: dict[str, Any], memory: JobMemory, new: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        phase = new.get("phase") or ""
        self.metrics.transitions.labels(phase, new.get("reason") or "").inc()
        age = self._age(body)
        if age is None:
            return
        if phase in RUNNING_PHASES and not memory.counted_queue:
            memory.counted_queue = True
            queue = ((body.get("spec") or {}).get("runPolicy") or {}).get("queueName") or ""
            self.metrics.queued_seconds.labels(key[0], queue).observe(age)
        if (new.get("progress") or {}).get("step") and not memory.counted_first_step:
            memory.counted_first_step = True
            self.metrics.first_step_seconds.observe(age)
        if phase in FINAL:
            self.metrics.job_duration.labels(phase).observe(age)

    @staticmethod
    def _age(body: dict[str, Any]) -> float | None:
        moment = parse_rfc3339(body.get("metadata", {}).get("creationTimestamp"))
        if moment is None:
            return None
        return max(0.0, (dt.datetime.now(dt.UTC) - moment).total_seconds())

    def _track_gpu(self, key: Key, status: dict[str, Any], memory: JobMemory) -> None:
        if self.metrics is None or not memory.gpus:
            return
        self.metrics.gpu_running(key[0], key[1], memory.gpus, status.get("phase") in RUNNING_PHASES)
        queue = memory.parsed.spec.run_policy.queue_name if memory.parsed is not None else None
        self.metrics.usage(key[0], key[1], queue, status.get("usage"))

    async def _create(
        self,
        key: Key,
        body: dict[str, Any],
        job_model: FineTuneJob,
        memory: JobMemory,
        previous: dict[str, Any],
    ) -> dict[str, Any] | None:
        namespace, name = key
        settings = self.settings
        rendered = render(
            body,
            job_model,
            trainer_image=settings.trainer_image,
            gpu_resource=settings.gpu_resource,
            default_tolerations=settings.default_tolerations,
            profile=self.policy.profiles.get(job_model.spec.resources.placement_profile),
            report_base_url=settings.report_url,
            report_audience=settings.report_audience,
            image_pull_policy=settings.image_pull_policy,
            image_pull_secrets=settings.trainer_image_pull_secrets,
            cache_size_limit=settings.cache_size_limit,
            tmp_size_limit=settings.tmp_size_limit,
            trainer_uid=settings.trainer_uid,
            report_ca=self.report_ca,
        )
        job_name = rendered.job["metadata"]["name"]
        try:
            if self.egress_denied:
                # Before the Job, so that no pod of it runs without the policy.
                policy = egress_policy(
                    name=name,
                    job_name=job_name,
                    namespace=namespace,
                    uid=body["metadata"]["uid"],
                    denied=self.egress_denied,
                )
                await self.api.ensure(policy, owner_uid=body["metadata"]["uid"])
            ensured = await self.api.ensure(rendered.job, owner_uid=body["metadata"]["uid"])
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:
                await self._create_failing(key, body, memory, previous, exc)
                return None
            if not 400 <= exc.status < 500 or exc.status in (401, 409):
                raise
            await self._rejected(key, body, memory, previous, exc)
            return None
        memory.rejections, memory.rejected = 0, ""
        memory.create_failures, memory.create_failing = 0, ""
        if ensured.outcome == Outcome.CONFLICT:
            existing = ensured.obj.get("metadata", {})
            earlier = existing.get("deletionTimestamp") or any(
                ref.get("kind") == "FineTuneJob"
                and ref.get("name") == name
                and ref.get("uid") != body["metadata"]["uid"]
                for ref in existing.get("ownerReferences") or []
            )
            if earlier:
                # An earlier FineTuneJob of this name was deleted and its Job is still being
                # collected: wait for it to go (its deletion wakes us), never adopt it.
                reason = Reason.WAITING_FOR_OLD_JOB
                message = (
                    f"the Job {job_name} of an earlier FineTuneJob named {name} is still being deleted; "
                    "this one's Job is created once it is gone"
                )
                events = []
            else:
                reason = Reason.NAME_CONFLICT
                message = (
                    f"a Job named {job_name} already exists and is not owned by this FineTuneJob (an earlier "
                    f"one's, kept by a delete with --cascade=orphan, or someone else's): delete it "
                    f"(kubectl -n {namespace} delete job {job_name}) and this one starts"
                )
                events = [("Warning", Reason.NAME_CONFLICT, message)]
            if previous.get("reason") != reason:
                await self._write(
                    key,
                    body,
                    memory,
                    previous,
                    with_phase(previous, Phase.PENDING, reason, message),
                    events=events,
                    cause="phase",
                )
            self.enqueue(key, delay=5 if earlier else 30)
            return None
        LOG.info(
            "event=job-%s namespace=%s name=%s job=%s",
            ensured.outcome.value,
            namespace,
            name,
            rendered.job["metadata"]["name"],
        )
        return ensured.obj

    async def _speed_book(self) -> speeds.SpeedBook:
        if self.speeds is None:
            body = None
            if self.settings.speeds_configmap:
                try:
                    body = await self.api.read_configmap(
                        self.settings.operator_namespace, self.settings.speeds_configmap
                    )
                except ApiError as exc:
                    LOG.warning(
                        "cannot read ConfigMap %s (%s): estimates start afresh", self.settings.speeds_configmap, exc
                    )
            self.speeds = speeds.SpeedBook.from_data((body or {}).get("data"))
        return self.speeds

    async def _estimate(self, job_model: FineTuneJob, previous: dict[str, Any]) -> EstimateStatus | None:
        """status.estimate for a job that has not started yet (none once it has)."""
        if not self.settings.speeds_configmap or previous.get("attempts") or previous.get("estimate"):
            return None
        return (await self._speed_book()).estimate(job_model.spec, self.prices)

    async def _record_speed(self, key: Key, job_model: FineTuneJob, status: dict[str, Any]) -> None:
        """A job that has just succeeded (not stopped early): its speed, for the estimates of jobs
        of its kind, kept in the ConfigMap."""
        if not self.settings.speeds_configmap or status.get("phase") != Phase.SUCCEEDED.value:
            return
        if status.get("reason") == Reason.STOPPED_EARLY.value:
            return
        progress, used = status.get("progress") or {}, status.get("usage") or {}
        book = await self._speed_book()
        recorded = book.record(
            job_model.spec,
            steps=int(progress.get("totalSteps") or 0),
            steps_per_second=float(progress.get("stepsPerSecond") or 0),
            run_seconds=sum(float(p.get("seconds") or 0) for p in used.get("pods") or []),
            product=used.get("gpuProduct"),
        )
        if not recorded:
            return
        self._speeds_unwritten = True
        try:
            async with self._speeds_written:
                if not self._speeds_unwritten:
                    return  # a write that began after this job's record has carried it
                self._speeds_unwritten = False
                await self.api.write_configmap(
                    self.settings.operator_namespace, self.settings.speeds_configmap, book.to_data()
                )
        except ApiError as exc:
            self._speeds_unwritten = True
            LOG.warning(
                "cannot write ConfigMap %s (%s): %s/%s's speed is kept in memory only",
                self.settings.speeds_configmap,
                exc,
                *key,
            )

    async def _products_of(self, pods: list[dict[str, Any]]) -> dict[str, str]:
        """The GPU product label of each node these pods ran on, each node read once (with
        settings.gpu_product_label; without it, or where the node cannot be read, none)."""
        label = self.settings.gpu_product_label
        if not label:
            return {}
        for pod in pods:
            node = pod.get("spec", {}).get("nodeName")
            if not node or node in self._gpu_products:
                continue
            try:
                body = await self.api.read_node(node) or {}
                self._gpu_products[node] = body.get("metadata", {}).get("labels", {}).get(label)
            except ApiError as exc:
                LOG.warning(f"cannot read node {node}'s {label} label ({exc}); status.usage has no gpuProduct")
                self._gpu_products[node] = None
        return {node: product for node, product in self._gpu_products.items() if product}

    def _create_wait(self, body: dict[str, Any], memory: JobMemory) -> float:
        """Seconds until the next try of a create that failed; 0 once due or the spec changed."""
        if int(body.get("metadata", {}).get("generation") or 0) != memory.create_generation:
            return 0.0
        return max(0.0, memory.create_not_before - asyncio.get_running_loop().time())

    def _back_off(self, body: dict[str, Any], memory: JobMemory, delay: float) -> None:
        memory.create_not_before = asyncio.get_running_loop().time() + delay
        memory.create_generation = int(body.get("metadata", {}).get("generation") or 0)

    async def _create_failing(
        self, key: Key, body: dict[str, Any], memory: JobMemory, previous: dict[str, Any], exc: ApiError
    ) -> None:
        """The Job could not be made for a reason that passes (a webhook that does not answer,
        an apiserver that is busy): on the resource from the first failure, with the apiserver's
        words and the next try's time, and an Event once per new error; tried again with back-off,
        and the reason goes with the next status once the Job is made."""
        error = redact(f"{exc.status} {exc.message or exc.reason}")
        memory.create_failures += 1
        delay = create_backoff(memory.create_failures)
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        message = (
            f"the Job could not be created ({error}); try {memory.create_failures + 1} at "
            f"{at:%H:%M:%S}Z (in {delay:.0f}s)"
        )
        LOG.warning(
            "event=job-create-failing namespace=%s name=%s retry_in=%.0fs error=%s",
            key[0],
            key[1],
            delay,
            json.dumps(describe_error(exc)),
        )
        events = [] if memory.create_failing == error else [("Warning", Reason.JOB_CREATE_FAILING, error)]
        await self._write(
            key,
            body,
            memory,
            previous,
            with_phase(previous, Phase.PENDING, Reason.JOB_CREATE_FAILING, message),
            events=events,
            cause="phase",
        )
        memory.create_failing = error
        self._back_off(body, memory, delay)
        self.enqueue(key, delay=delay)

    async def _rejected(
        self, key: Key, body: dict[str, Any], memory: JobMemory, previous: dict[str, Any], exc: ApiError
    ) -> None:
        """The apiserver refused the Job: its words in the status and an Event (once per new
        refusal), and another try later, sooner when the spec changes."""
        message = redact(explain_rejection(exc))
        memory.rejections += 1
        delay = create_backoff(memory.rejections)
        LOG.warning(
            "event=job-rejected namespace=%s name=%s retry_in=%.0fs error=%s",
            key[0],
            key[1],
            delay,
            json.dumps(describe_error(exc)),
        )
        if memory.rejected != message or previous.get("reason") != Reason.JOB_REJECTED:
            await self._write(
                key,
                body,
                memory,
                previous,
                with_phase(
                    previous,
                    Phase.PENDING,
                    Reason.JOB_REJECTED,
                    message,
                    generation=body.get("metadata", {}).get("generation"),
                ),
                events=[("Warning", Reason.JOB_REJECTED, message)],
                cause="phase",
            )
            memory.rejected = message
        self._back_off(body, memory, delay)
        self.enqueue(key, delay=delay)

    async def _sync_job(self, key: Key, job: dict[str, Any], job_model: FineTuneJob) -> None:
        """Apply the mutable settings: suspension, both ways.  (The TTL waits for the final
        status: see ``_finished``.)"""
        policy = job_model.spec.run_policy
        spec = job.get("spec") or {}
        finished = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )
        if finished:
            return
        patch: dict[str, Any] = {}
        suspended = bool(spec.get("suspend"))
        if policy.queue_name:
            # Kueue owns this Job's suspension and undoes anyone else's: spec.runPolicy.suspend
            # reaches it as the Workload's spec.active instead.
            await self._sync_workload(key, job, suspend=policy.suspend)
        elif policy.suspend and not suspended:
            patch["suspend"] = True
        elif not policy.suspend and suspended:
            patch["suspend"] = False
        if patch:
            LOG.info("event=job-sync namespace=%s name=%s patch=%s", key[0], key[1], patch)
            await self.api.patch_job(key[0], job["metadata"]["name"], {"spec": patch})

    async def _sync_workload(self, key: Key, job: dict[str, Any], *, suspend: bool) -> None:
        """Deactivate the Workload while the FineTuneJob is suspended (Kueue then stops the Job
        and keeps it out of the queue), activate it again when it is resumed."""
        workload = self.cache.workload_of(key[0], job)
        if workload is None:
            return  # Kueue has not made it yet; its creation wakes us.
        active = (workload.get("spec") or {}).get("active", True) is not False
        if active != suspend:
            return
        name = workload["metadata"]["name"]
        LOG.info("event=workload-sync namespace=%s name=%s workload=%s active=%s", key[0], key[1], name, not suspend)
        try:
            await self.api.patch_workload(key[0], name, {"spec": {"active": not suspend}})
        except ApiError as exc:
            if exc.status != 404:
                raise

    def forget(self, key: Key) -> None:
        self.memory.pop(key, None)
        self.progress.forget(key)
        if self.metrics:
            self.metrics.forget(*key)

    # --- views -----------------------------------------------------------------------------------

    def job_views(self) -> list[JobView]:
        views = []
        for key in self.keys():
            body = self.cache.ftj(key)
            if body is None:
                continue
            memory = self.memory.get(key)
            status = self._base_status(body, memory) if memory else dict(body.get("status") or {})
            progress = status.get("progress") or {}
            event = self.progress.latest(key)
            gpus = memory.gpus if memory else 0
            views.append(
                JobView(
                    namespace=key[0],
                    name=key[1],
                    phase=status.get("phase") or Phase.PENDING.value,
                    step=event.step if event else progress.get("step"),
                    total_steps=event.total_steps if event else progress.get("totalSteps"),
                    loss=event.loss if event and event.loss is not None else progress.get("loss"),
                    steps_per_second=event.steps_per_second if event else progress.get("stepsPerSecond"),
                    gpus=gpus,
                    queue=((body.get("spec") or {}).get("runPolicy") or {}).get("queueName") or "",
                    gpu_utilization=event.gpu_utilization if event else progress.get("gpuUtilization"),
                    best_scores=dict(
                        (event.evaluation.best_scores if event and event.evaluation else None)
                        or (status.get("evaluation") or {}).get("bestScores")
                        or {}
                    ),
                )
            )
        return views
