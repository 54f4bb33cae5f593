"""(FineTuneJob, its Job, its Pods, the newest progress report) -> the FineTuneJob's status.

Pure functions.  The reconciler feeds them what its caches hold and patches the
difference; nothing here talks to the API.

The status is built from the API's status model (``FineTuneJobStatus`` and its parts:
``Progress``, ``Condition``, ``OutputStatus``...), field by field, and handed on in its wire
form (``wire``): camelCase, only the fields that are set, no nulls.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_api.redact import redact
from finetune_api.report import ProgressEvent, TrainerSummary
from finetune_api.v1alpha1 import (
    CheckpointRef,
    Condition,
    DatasetStatus,
    EstimateStatus,
    EvaluationStatus,
    FailureReason,
    FineTuneJobSpec,
    FineTuneJobStatus,
    OutputStatus,
    Phase,
    Progress,
    QueueStatus,
    Reason,
    Stage,
)
from finetune_operator import queueing, usage
from finetune_operator.claims import ClaimMount, display_uri
from finetune_operator.failures import (
    Failure,
    classify_job_failure,
    classify_pod,
    has_condition,
    summary_of,
    unschedulable,
    waiting_problem,
)
from finetune_operator.timestamps import rfc3339

INITIALIZING_STAGES = {Stage.STARTING, Stage.DOWNLOADING, Stage.CLASS_IMAGES, Stage.CACHING, Stage.COMPILING}
TRAINING_STAGES = {Stage.TRAINING, Stage.CHECKPOINTING, Stage.SAMPLING, Stage.EVALUATING}
EXPORTING_STAGES = {Stage.EXPORTING, Stage.UPLOADING, Stage.DONE}
CONDITION_TYPES = ("Created", "Queued", "Running", "Suspended", "Succeeded", "Failed")
FINAL_PHASES = frozenset(phase for phase in Phase if phase.final)
# Before the first step the reason is the trainer's stage, in CamelCase ("class-images": ClassImages).
STAGE_REASONS = {
    stage: Reason(stage.value.title().replace("-", ""))
    for stage in Stage
    if stage not in TRAINING_STAGES | EXPORTING_STAGES
}
# Reasons whose Event is a warning (every failure's is too).
WARNING_REASONS = frozenset(
    {Reason.UNSCHEDULABLE, FailureReason.IMAGE_PULL_BACK_OFF, Reason.RETRYING, Reason.PREEMPTED}
)
# The status's fields as the API spells them.
_WIRE_NAMES = frozenset(field.alias or name for name, field in FineTuneJobStatus.model_fields.items())


@dataclass(frozen=True)
class Observed:
    """What the operator knows about one FineTuneJob's running parts."""

    job: dict[str, Any] | None
    pods: Sequence[dict[str, Any]] = ()
    progress: ProgressEvent | None = None
    job_missing_confirmed: bool = False
    seen_pods: int = 0
    # Kueue's Workload of the Job, and its place in the queue while it waits (where known).
    workload: dict[str, Any] | None = None
    position: queueing.Position | None = None
    # The GPU product of each node its pods ran on (the node's product label), where read.
    gpu_products: Mapping[str, str] = field(default_factory=dict)
    # What finished jobs of the same kind say this one will take (speeds.SpeedBook), if anything.
    estimate: EstimateStatus | None = None


@dataclass(frozen=True)
class Decision:
    phase: Phase
    reason: str
    message: str


@dataclass
class Transition:
    """A phase change worth an Event."""

    type: str
    reason: str
    message: str


@dataclass
class StatusResult:
    status: dict[str, Any]
    events: list[Transition] = field(default_factory=list)


def _sorted_pods(pods: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(pods, key=lambda p: (p.get("metadata", {}).get("creationTimestamp") or "", p["metadata"]["name"]))


def _active(pods: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        p
        for p in pods
        if p.get("status", {}).get("phase") in (None, "Pending", "Running")
        and not p.get("metadata", {}).get("deletionTimestamp")
    ]


def format_duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def decide_phase(
    spec: FineTuneJobSpec,
    previous: dict[str, Any],
    observed: Observed,
) -> Decision:
    """The phase, its reason and a one-line message."""
    job = observed.job
    pods = _sorted_pods(observed.pods)
    if job is None:
        if observed.job_missing_confirmed and previous.get("jobName"):
            return Decision(
                Phase.FAILED,
                FailureReason.JOB_DELETED,
                f"the Job {previous['jobName']} was deleted before the training finished; outputs already "
                "written stay in place; create a new FineTuneJob to train again",
            )
        return Decision(Phase.PENDING, Reason.CREATING, "creating the training Job")

    if has_condition(job, "Complete") or has_condition(job, "SuccessCriteriaMet"):
        return Decision(Phase.SUCCEEDED, Reason.COMPLETED, "training finished; the model is exported")
    if has_condition(job, "Failed") or has_condition(job, "FailureTarget"):
        failure = classify_job_failure(
            job, list(pods), backoff_limit=spec.run_policy.backoff_limit, memory=spec.resources.memory
        )
        return Decision(Phase.FAILED, failure.reason, failure.message)

    active = _active(pods)
    suspended = bool(job.get("spec", {}).get("suspend"))
    if spec.run_policy.suspend:
        message = "suspended by spec.runPolicy.suspend; set it to false to continue from the newest checkpoint"
        if active:
            message = "stopping the training pod (spec.runPolicy.suspend is true)"
        return Decision(Phase.SUSPENDED, Reason.SUSPENDED, message)
    queue = spec.run_policy.queue_name
    if suspended:
        if queue:
            held = queueing.held(observed.workload, queue=queue, position=observed.position)
            return Decision(held.phase, held.reason, held.message)
        return Decision(Phase.QUEUED, Reason.JOB_SUSPENDED, "the Job is suspended")
    # Admitted by Kueue, the pod not yet running: Initializing, not back to Pending.
    kueue_admitted = bool(queue) and queueing.admitted(observed.workload)

    if not active:
        failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
        if failed:
            failure = classify_pod(failed[-1], memory=spec.resources.memory) or Failure(Reason.RETRYING, "")
            return Decision(
                Phase.PENDING, Reason.RETRYING, f"retrying after {failure.reason}: {failure.message}"[:1000]
            )
        previous_phase = previous.get("phase")
        if kueue_admitted and previous_phase not in (Phase.TRAINING, Phase.EXPORTING):
            assert observed.workload is not None
            return Decision(Phase.INITIALIZING, Reason.ADMITTED, queueing.admitted_message(observed.workload))
        if previous_phase in (Phase.SUSPENDED, None, Phase.PENDING):
            return Decision(Phase.PENDING, Reason.STARTING, "waiting for the training pod")
        return Decision(Phase(previous_phase), previous.get("reason") or "", previous.get("message") or "")

    pod = active[-1]
    scheduler_message = unschedulable(pod)
    if scheduler_message is not None:
        return Decision(Phase.QUEUED, Reason.UNSCHEDULABLE, scheduler_message)
    problem = waiting_problem(pod)
    if problem is not None:
        return Decision(Phase.INITIALIZING, problem.reason, problem.message)
    pod_phase = pod.get("status", {}).get("phase")
    node = pod.get("spec", {}).get("nodeName")
    if not node:
        return Decision(
            Phase.INITIALIZING if kueue_admitted else Phase.PENDING,
            Reason.SCHEDULING,
            "waiting for the scheduler to place the training pod",
        )
    if pod_phase != "Running":
        return Decision(Phase.INITIALIZING, Reason.POD_STARTING, f"starting the trainer on {node}")
    progress = observed.progress
    pod_name = pod["metadata"]["name"]
    if progress is None or (progress.attempt and progress.attempt != pod_name):
        return Decision(Phase.INITIALIZING, Reason.TRAINER_STARTING, "the trainer is starting")
    stage = Stage(progress.stage)
    if stage in TRAINING_STAGES:
        return Decision(Phase.TRAINING, Reason.TRAINING, progress.message or f"training ({stage.value})")
    if stage in EXPORTING_STAGES:
        return Decision(Phase.EXPORTING, Reason.EXPORTING, progress.message or f"{stage.value}")
    return Decision(Phase.INITIALIZING, STAGE_REASONS[stage], progress.message or stage.value)


def _condition(
    conditions: list[Condition], kind: str, status: bool, *, reason: str, message: str, now: str
) -> list[Condition]:
    """``conditions`` with ``kind`` set; a condition that was never True is not added False."""
    value = "True" if status else "False"
    for index, condition in enumerate(conditions):
        if condition.type == kind:
            changed = now if condition.status != value else condition.last_transition_time
            updated = Condition(
                type=kind, status=value, reason=reason, message=message[:1000], last_transition_time=changed
            )
            return [*conditions[:index], updated, *conditions[index + 1 :]]
    if not status:
        return conditions
    added = Condition(type=kind, status=value, reason=reason, message=message[:1000], last_transition_time=now)
    return [*conditions, added]


def _progress_fields(
    event: ProgressEvent | TrainerSummary, mounts: Sequence[ClaimMount], *, final: bool
) -> dict[str, Any]:
    """status.progress / checkpoints / output / warnings / dataset from a report or the final
    summary, by field name; a field left out is not written."""
    out: dict[str, Any] = {}
    total = event.total_steps
    percent = round(100.0 * event.step / total, 1) if total else None
    if isinstance(event, ProgressEvent):
        out["progress"] = Progress(
            stage=event.stage,
            step=event.step,
            total_steps=total,
            percent=percent,
            loss=_rounded(event.loss),
            learning_rate=_rounded(event.learning_rate),
            steps_per_second=_rounded(event.steps_per_second),
            eta_seconds=0 if final else event.eta_seconds,
            peak_memory_bytes=event.peak_memory_bytes,
            gpu_utilization=event.gpu_utilization,
            update_time=event.time,
        )
    else:
        out["progress"] = Progress(
            stage=Stage.DONE if event.phase == Phase.SUCCEEDED else Stage.FAILED,
            step=event.step,
            total_steps=total,
            percent=percent,
            eta_seconds=0 if final else None,
        )
    if event.checkpoints:
        out["checkpoints"] = [
            CheckpointRef(
                step=c.step,
                uri=_shown(c.uri, mounts),
                size_bytes=c.size_bytes,
                time=c.time,
                **({"scores": dict(c.scores)} if c.scores else {}),
            )
            for c in event.checkpoints
        ]
    uri = event.output_uri
    if uri or event.files or event.samples:
        output: dict[str, Any] = {}
        if uri:
            output["uri"] = _shown(uri, mounts)
        if event.files:
            output["files"] = list(event.files)
        if event.samples:
            output["samples"] = [_shown(s, mounts) for s in event.samples]
        out["output"] = OutputStatus(**output)
    if event.warnings:
        out["warnings"] = [redact(w) for w in event.warnings]
    if event.dataset is not None:
        # Every field counts as set: the wire form shows the defaults of what the trainer left out.
        out["dataset"] = DatasetStatus.model_validate(event.dataset.model_dump())
    if event.evaluation is not None:
        out["evaluation"] = EvaluationStatus.model_validate(event.evaluation.model_dump())
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _shown(path: str, mounts: Sequence[ClaimMount]) -> str:
    """A path the trainer reported, as a person sees it: pvc:// for a mount, and no secret."""
    return redact(display_uri(path, list(mounts)) or path)


def _the_record(
    output: OutputStatus | None, summary: TrainerSummary, mounts: Sequence[ClaimMount]
) -> OutputStatus | None:
    """At the end, the trainer's termination summary is the record of what it wrote: a report
    (which may have come late, or from someone holding the pod's token) cannot change the
    output folder or a file's size and hash.  Files only a report lists (the summary leaves
    out files inside folders when it runs out of its 4 KiB) are kept."""
    recorded: OutputStatus | None = _progress_fields(summary, mounts, final=True).get("output")
    if recorded is None:
        return output
    fields = {name: getattr(output, name) for name in output.model_fields_set} if output is not None else {}
    if recorded.uri:
        fields["uri"] = recorded.uri
    if recorded.files:
        record = {f.path: f for f in recorded.files}
        reported = [record.get(f.path, f) for f in fields.get("files") or []]
        listed = {f.path for f in reported}
        fields["files"] = reported + [f for f in recorded.files if f.path not in listed]
    return OutputStatus(**fields)


def _previous_fields(previous: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The status the server holds -> (its fields by name, as the model's parts; whatever the
    model does not know, kept as it is: a newer operator may have written it)."""
    known = {key: value for key, value in previous.items() if key in _WIRE_NAMES}
    model = FineTuneJobStatus.model_validate(known)
    fields = {name: getattr(model, name) for name in model.model_fields_set}
    return fields, {key: value for key, value in previous.items() if key not in _WIRE_NAMES}


def wire(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API holds it: camelCase, only the fields set, no nulls."""
    return status.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)


def with_phase(
    previous: dict[str, Any] | None,
    phase: Phase,
    reason: str,
    message: str,
    *,
    generation: int | None = None,
) -> dict[str, Any]:
    """The status the server holds with a new phase, reason and message (and, when given, the
    generation they answer): what the reconciler writes when it stops before a Job exists (an
    invalid spec, a name taken, a Job refused).  Built through the model like every status."""
    fields, unknown = _previous_fields(previous or {})
    fields.update(phase=phase, reason=reason, message=message[:1000])
    if generation is not None:
        fields["observed_generation"] = generation
    new = wire(FineTuneJobStatus(**fields))
    new.update(unknown)
    return new


def compute_status(
    previous: dict[str, Any] | None,
    spec: FineTuneJobSpec,
    observed: Observed,
    *,
    generation: int | None,
    job_name: str,
    mounts: Sequence[ClaimMount] = (),
    now: dt.datetime | None = None,
    prices: usage.Prices = usage.NO_PRICES,
) -> StatusResult:
    """The whole new status.  A final phase is kept as it is: nothing overwrites a result."""
    previous = previous or {}
    if previous.get("phase") in FINAL_PHASES:
        return StatusResult(copy.deepcopy(previous))
    stamp = rfc3339(now or dt.datetime.now(dt.UTC))

    decision = decide_phase(spec, previous, observed)
    decision = Decision(decision.phase, decision.reason, redact(decision.message))
    # The new status by FineTuneJobStatus's field names, starting from the one the server holds.
    status, unknown = _previous_fields(previous)
    status["phase"] = decision.phase
    status["reason"] = decision.reason
    status["message"] = decision.message[:1000]
    status["observed_generation"] = generation
    if observed.job is not None or previous.get("jobName"):
        status["job_name"] = job_name
    queue = queueing.queue_status(observed.workload, queue=spec.run_policy.queue_name, position=observed.position)
    if queue is not None:
        status["queue"] = QueueStatus.model_validate(queue)
    else:
        status.pop("queue", None)

    job = observed.job or {}
    job_status = job.get("status", {})
    counted = int(job_status.get("active") or 0) + int(job_status.get("failed") or 0)
    counted += int(job_status.get("succeeded") or 0)
    attempts = max(int(previous.get("attempts") or 0), counted, observed.seen_pods)
    if attempts:
        status["attempts"] = attempts
    if job_status.get("startTime") and not status.get("start_time"):
        status["start_time"] = job_status["startTime"]
    used = usage.usage_of(
        previous.get("usage"),
        observed.pods,
        gpus=spec.resources.gpus,
        progress=observed.progress,
        gpu_products=observed.gpu_products,
        prices=prices,
    )
    if used is not None:
        status["usage"] = used
    elif observed.estimate is not None and not attempts and "estimate" not in status:
        # Before anything ran, once; never for a job that has started.
        status["estimate"] = observed.estimate

    # Progress: the newest report of the current attempt; at the end, the trainer's
    # summary (termination message) when no final report arrived.
    final_summary: TrainerSummary | None = None
    if decision.phase.final:
        for pod in reversed(_sorted_pods(observed.pods)):
            raw = summary_of(pod)
            if raw is not None:
                try:
                    final_summary = TrainerSummary.model_validate(raw)
                except ValueError:
                    final_summary = None
                break
    event = observed.progress
    stopped = decision.phase == Phase.SUCCEEDED and (
        (final_summary is not None and final_summary.reason == Reason.STOPPED_EARLY)
        or (event is not None and "stop" in event.done)
    )
    if stopped:
        # Stopped on request (finetune.dev/stop-now): a success, at the step it stopped at.
        decision = Decision(
            Phase.SUCCEEDED,
            Reason.STOPPED_EARLY,
            "stopped as asked (finetune.dev/stop-now); the model of the step it stopped at is exported",
        )
        status["reason"], status["message"] = decision.reason, decision.message
    if event is not None and (decision.phase != Phase.SUCCEEDED or event.stage == Stage.DONE or final_summary is None):
        status.update(_progress_fields(event, mounts, final=decision.phase == Phase.SUCCEEDED))
    elif final_summary is not None:
        status.update(_progress_fields(final_summary, mounts, final=True))
    if final_summary is not None and final_summary.phase == decision.phase.value == Phase.SUCCEEDED:
        status["output"] = _the_record(status.get("output"), final_summary, mounts)
    progress: Progress | None = status.get("progress")
    if decision.phase == Phase.SUCCEEDED and progress is not None:
        done: dict[str, Any] = {"stage": Stage.DONE, "eta_seconds": 0}
        if progress.total_steps and not stopped:
            done.update(step=max(progress.step or 0, progress.total_steps), percent=100.0)
        progress = status["progress"] = progress.model_copy(update=done)

    if progress is not None and progress.total_steps:
        status["progress_text"] = f"{progress.step or 0}/{progress.total_steps} ({progress.percent or 0:.0f}%)"
    eta = progress.eta_seconds if progress is not None else None
    if decision.phase == Phase.TRAINING and eta is not None:
        status["eta_text"] = format_duration(eta)
    else:
        status.pop("eta_text", None)

    if decision.phase.final:
        completion = job_status.get("completionTime")
        for condition in job_status.get("conditions") or []:
            if condition.get("type") in ("Failed", "Complete") and condition.get("status") == "True":
                completion = completion or condition.get("lastTransitionTime")
        status["completion_time"] = completion or stamp

    conditions: list[Condition] = list(status.get("conditions") or [])
    phase = decision.phase
    running = phase in (Phase.INITIALIZING, Phase.TRAINING, Phase.EXPORTING)
    reason, message = decision.reason, decision.message
    if observed.job is not None:
        conditions = _condition(
            conditions, "Created", True, reason=Reason.JOB_CREATED, message=f"created Job {job_name}", now=stamp
        )
    for kind, active, inactive in (
        ("Queued", phase in (Phase.QUEUED, Phase.PREEMPTED), Reason.NOT_QUEUED),
        ("Running", running, Reason.NOT_RUNNING),
        ("Suspended", phase == Phase.SUSPENDED, Reason.NOT_SUSPENDED),
        ("Succeeded", phase == Phase.SUCCEEDED, Reason.NOT_SUCCEEDED),
        ("Failed", phase == Phase.FAILED, Reason.NOT_FAILED),
    ):
        conditions = _condition(
            conditions, kind, active, reason=reason if active else inactive, message=message, now=stamp
        )
    conditions.sort(key=lambda c: CONDITION_TYPES.index(c.type) if c.type in CONDITION_TYPES else 99)
    status["conditions"] = conditions
    new = wire(FineTuneJobStatus(**status))
    new.update(unknown)

    events: list[Transition] = []
    # A new FineTuneJob's first phase (Pending) is no transition: no Event, no extra write.
    first = previous.get("phase") is None and phase == Phase.PENDING
    if (not first and previous.get("phase") != phase.value) or (
        previous.get("reason") != decision.reason and phase in (Phase.QUEUED, Phase.INITIALIZING)
    ):
        warning = phase == Phase.FAILED or decision.reason in WARNING_REASONS
        events.append(
            Transition(
                "Warning" if warning else "Normal",
                decision.reason
                if phase == Phase.FAILED or (previous.get("phase") == phase.value and decision.reason)
                else phase.value,
                f"{phase.value}: {decision.message}" if decision.message else phase.value,
            )
        )
    return StatusResult(new, events)


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7396) from ``old`` to ``new``: changed keys, removed keys as null."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = status_patch(before, value)
        else:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
