"""Prometheus metrics of the operator (``/metrics``).

Counters and histograms are updated as things happen.  Gauges that describe the
jobs (by phase; step, loss and speed of each running job) are computed at scrape
time from the reconciler's view, so a deleted job's series disappear with it and
the number of series stays bounded by the number of FineTuneJobs.

No series names a FineTuneJob unless ``--metrics-per-job`` asks for them: the port has no
authentication, and a job's name, phase and loss are its namespace's business.  Without
it, /metrics has counts by phase, by namespace and queue, and GPU-seconds by namespace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_api.v1alpha1 import Phase

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


@dataclass(frozen=True)
class JobView:
    """What the metrics need of one FineTuneJob."""

    namespace: str
    name: str
    phase: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    steps_per_second: float | None = None
    gpus: int = 0
    queue: str = ""  # the Kueue LocalQueue (spec.runPolicy.queueName), if any
    gpu_utilization: float | None = None  # percent, at the newest report (NVML)
    # spec.evaluation: the best checkpoint's scores (dino, clipI, clipT).
    best_scores: dict[str, float] = field(default_factory=dict)


class _JobsCollector(Collector):
    def __init__(
        self,
        jobs: Callable[[], Iterable[JobView]],
        gpu_seconds: Callable[[], dict[str, float]],
        used: Callable[[], UsageTotals],
        *,
        per_job: bool,
    ) -> None:
        self._jobs = jobs
        self._gpu_seconds = gpu_seconds
        self._used = used
        self._per_job = per_job

    def collect(self) -> Iterator[Metric]:
        by_phase = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase.", labels=["phase"])
        step = GaugeMetricFamily("finetune_job_step", "Training steps done.", labels=["namespace", "name"])
        total = GaugeMetricFamily(
            "finetune_job_total_steps", "Training steps in the run.", labels=["namespace", "name"]
        )
        loss = GaugeMetricFamily("finetune_job_loss", "Smoothed training loss.", labels=["namespace", "name"])
        speed = GaugeMetricFamily(
            "finetune_job_steps_per_second", "Recent training speed.", labels=["namespace", "name"]
        )
        busy = GaugeMetricFamily(
            "finetune_job_gpu_utilization",
            "How busy the job's GPU was at its newest report, percent (NVML).",
            labels=["namespace", "name"],
        )
        scores = GaugeMetricFamily(
            "finetune_job_best_score",
            "spec.evaluation: the best checkpoint's scores so far (dino, clipI, clipT).",
            labels=["namespace", "name", "score"],
        )
        info = GaugeMetricFamily(
            "finetune_job_info",
            "One series per FineTuneJob, labelled with its phase.",
            labels=["namespace", "name", "phase"],
        )
        by_queue = GaugeMetricFamily(
            "finetune_queue_jobs",
            "FineTuneJobs with a Kueue LocalQueue, by namespace, queue and phase: which team waits.",
            labels=["namespace", "queue", "phase"],
        )
        counts = {phase.value: 0 for phase in Phase}
        queues: dict[tuple[str, str, str], int] = {}
        for job in self._jobs():
            phase = job.phase or Phase.PENDING.value
            counts[phase] = counts.get(phase, 0) + 1
            if job.queue:
                queues[(job.namespace, job.queue, phase)] = queues.get((job.namespace, job.queue, phase), 0) + 1
            if not self._per_job:
                continue
            labels = [job.namespace, job.name]
            info.add_metric([*labels, phase], 1)
            if job.step is not None:
                step.add_metric(labels, job.step)
            if job.total_steps:
                total.add_metric(labels, job.total_steps)
            if job.loss is not None:
                loss.add_metric(labels, job.loss)
            if job.steps_per_second is not None:
                speed.add_metric(labels, job.steps_per_second)
            if job.gpu_utilization is not None:
                busy.add_metric(labels, job.gpu_utilization)
            for score, value in sorted(job.best_scores.items()):
                scores.add_metric([*labels, score], value)
        for phase, count in counts.items():
            by_phase.add_metric([phase], count)
        for labels_, count in sorted(queues.items()):
            by_queue.add_metric(list(labels_), count)
        gpu = CounterMetricFamily(
            "finetune_gpu_seconds", "GPU-seconds held by training pods, by namespace.", labels=["namespace"]
        )
        for namespace, seconds in sorted(self._gpu_seconds().items()):
            gpu.add_metric([namespace], seconds)
        used = self._used()
        used_seconds = CounterMetricFamily(
            "finetune_usage_gpu_seconds",
            "GPU-seconds of status.usage (pods' running time, every attempt), by namespace and queue.",
            labels=["namespace", "queue"],
        )
        for where, seconds in sorted(used.gpu_seconds.items()):
            used_seconds.add_metric(list(where), seconds)
        cost = CounterMetricFamily(
            "finetune_cost",
            "status.usage.cost, by namespace, queue and currency.",
            labels=["namespace", "queue", "currency"],
        )
        for keys, amount in sorted(used.cost.items()):
            cost.add_metric(list(keys), amount)
        yield from (by_phase, by_queue, gpu, used_seconds, cost)
        if self._per_job:
            yield from (info, step, total, loss, speed, busy, scores)


@dataclass
class UsageTotals:
    """status.usage summed: GPU-seconds by (namespace, queue), cost by (namespace, queue, currency)."""

    gpu_seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    cost: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def add(self, queue: tuple[str, str], gpu_seconds: float, cost: float | None, currency: str | None) -> None:
        self.gpu_seconds[queue] = self.gpu_seconds.get(queue, 0.0) + gpu_seconds
        if cost is not None and currency:
            key = (*queue, currency)
            self.cost[key] = self.cost.get(key, 0.0) + cost


class Metrics:
    def __init__(self, *, per_job: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transitions = Counter(
            "finetune_phase_transitions", "Phase transitions of FineTuneJobs.", ["phase", "reason"], registry=r
        )
        self.queued_seconds = Histogram(
            "finetune_queued_seconds",
            'Time from creation until the training pod first ran, by namespace and Kueue LocalQueue ("" without one).',
            ["namespace", "queue"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.first_step_seconds = Histogram(
            "finetune_time_to_first_step_seconds",
            "Time from creation until the first training step was reported.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_duration = Histogram(
            "finetune_job_duration_seconds",
            "Time from creation until the job ended, by result.",
            ["result"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds",
            "Time one reconcile of a FineTuneJob took.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "finetune_reconcile_errors", "Reconciles that raised an error.", ["kind"], registry=r
        )
        self.reports = Counter(
            "finetune_progress_reports", "Progress reports received, by result.", ["result", "reason"], registry=r
        )
        self.token_reviews = Counter(
            "finetune_token_reviews",
            "TokenReviews and SubjectAccessReviews the operator asked the apiserver for, by purpose and result.",
            ["purpose", "result"],
            registry=r,
        )
        self.status_patches = Counter("finetune_status_patches", "Status patches sent.", ["cause"], registry=r)
        self.status_patch_errors = Counter("finetune_status_patch_errors", "Status patches that failed.", registry=r)
        self.own_writes_skipped = Counter(
            "finetune_own_status_writes_skipped",
            "FineTuneJob changes that were only the operator's own status write, not reconciled again.",
            registry=r,
        )
        self.events_dropped = Counter(
            "finetune_events_dropped", "Kubernetes Events dropped because too many waited to be posted.", registry=r
        )
        self._gpu_seconds: dict[str, float] = {}
        self._gpu_running: dict[tuple[str, str], tuple[float, int]] = {}
        self._jobs: Callable[[], Iterable[JobView]] = list
        # Each job's status.usage as last computed, and what jobs since deleted had used.
        self._usage: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self._retired = UsageTotals()
        r.register(_JobsCollector(self._current_jobs, self._gpu_totals, self._usage_totals, per_job=per_job))

    def _current_jobs(self) -> Iterable[JobView]:
        return self._jobs()

    def bind_jobs(self, jobs: Callable[[], Iterable[JobView]]) -> None:
        self._jobs = jobs

    # GPU-seconds accrue while a training pod runs; the open interval is added at scrape time.

    def gpu_running(self, namespace: str, name: str, gpus: int, running: bool) -> None:
        key = (namespace, name)
        now = time.monotonic()
        if key in self._gpu_running:
            started, held = self._gpu_running.pop(key)
            self._gpu_seconds[namespace] = self._gpu_seconds.get(namespace, 0.0) + (now - started) * held
        if running:
            self._gpu_running[key] = (now, gpus)

    def _gpu_totals(self) -> dict[str, float]:
        now = time.monotonic()
        totals = dict(self._gpu_seconds)
        for (namespace, _), (started, held) in self._gpu_running.items():
            totals[namespace] = totals.get(namespace, 0.0) + (now - started) * held
        return totals

    def forget(self, namespace: str, name: str) -> None:
        self.gpu_running(namespace, name, 0, False)
        gone = self._usage.pop((namespace, name), None)
        if gone is not None:
            self._add(self._retired, namespace, *gone)

    def usage(self, namespace: str, name: str, queue: str | None, used: dict[str, Any] | None) -> None:
        """A job's status.usage (wire form), as the status now says; ``queue`` None: as before."""
        if used:
            known = self._usage.get((namespace, name))
            self._usage[(namespace, name)] = (queue if queue is not None else (known[0] if known else ""), used)

    @staticmethod
    def _add(totals: UsageTotals, namespace: str, queue: str, used: dict[str, Any]) -> None:
        totals.add((namespace, queue), float(used.get("gpuSeconds") or 0), used.get("cost"), used.get("currency"))

    def _usage_totals(self) -> UsageTotals:
        totals = UsageTotals(dict(self._retired.gpu_seconds), dict(self._retired.cost))
        for (namespace, _), (queue, used) in self._usage.items():
            self._add(totals, namespace, queue, used)
        return totals


def prometheus_text(metrics: Metrics) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
