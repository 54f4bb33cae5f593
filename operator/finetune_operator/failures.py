"""Why a training pod or Job failed, in reasons a person can act on.  Pure functions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune_api.contract import CONTAINER_NAME
from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import FailureReason

# The kubelet's reasons for a container that cannot start.
IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {FailureReason.CREATE_CONTAINER_CONFIG_ERROR, FailureReason.CREATE_CONTAINER_ERROR}


@dataclass(frozen=True)
class Failure:
    # A FailureReason, or the Job's own reason where nothing of ours explains its failure.
    reason: str
    message: str
    retried: bool = False


def trainer_state(pod: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's state (``{"terminated": {...}}`` and so on), or {}."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            return dict(status.get("state") or {})
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return dict(statuses[0].get("state") or {}) if statuses else {}


def summary_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's JSON summary from the termination message, if it wrote one."""
    message = trainer_state(pod).get("terminated", {}).get("message") or ""
    text = message.strip()
    if not text.startswith("{"):
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _message_of(pod: dict[str, Any]) -> str:
    summary = summary_of(pod)
    if summary and summary.get("message"):
        return str(summary["message"])
    raw = (trainer_state(pod).get("terminated", {}).get("message") or "").strip()
    lines = [line for line in raw.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def has_condition(obj: dict[str, Any], kind: str, status: str = "True") -> dict[str, Any] | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == status:
            return dict(condition)
    return None


def classify_pod(pod: dict[str, Any], *, memory: str = "") -> Failure | None:
    """A failed pod -> why.  None while the pod has not failed."""
    if pod.get("status", {}).get("phase") != "Failed":
        return None
    disruption = has_condition(pod, "DisruptionTarget")
    terminated = trainer_state(pod).get("terminated", {})
    code = terminated.get("exitCode")
    if disruption is not None:
        reason = disruption.get("reason") or "Disrupted"
        kind = (
            FailureReason.PREEMPTED
            if "Preemption" in reason
            else FailureReason.NODE_LOST
            if "Taint" in reason
            else FailureReason.EVICTED
        )
        return Failure(kind, f"the pod was stopped by the cluster ({reason}): retrying", retried=True)
    if code == ExitCode.BAD_INPUT:
        return Failure(FailureReason.BAD_INPUT, _message_of(pod) or "the trainer rejected its input")
    if code == ExitCode.OUT_OF_MEMORY:
        return Failure(FailureReason.OUT_OF_MEMORY, _message_of(pod) or "the GPU ran out of memory")
    if terminated.get("reason") == "OOMKilled":
        return Failure(
            FailureReason.OOM_KILLED,
            f"the trainer used more host memory than its limit (spec.resources.memory={memory or 'unset'}): "
            "raise spec.resources.memory, or lower spec.training.batchSize",
        )
    status_reason = pod.get("status", {}).get("reason")
    if status_reason in ("Evicted", "NodeLost", "Shutdown", "Terminated"):
        return Failure(FailureReason.NODE_LOST, pod.get("status", {}).get("message") or status_reason, retried=True)
    message = _message_of(pod)
    detail = f"exit code {code}" if code is not None else "no exit code"
    return Failure(FailureReason.ERROR, f"{detail}: {message}" if message else detail, retried=True)


def classify_job_failure(
    job: dict[str, Any], pods: list[dict[str, Any]], *, backoff_limit: int, memory: str
) -> Failure:
    """A Job with the Failed condition -> the reason to put on the FineTuneJob."""
    condition = has_condition(job, "Failed") or {}
    job_reason = condition.get("reason", "")
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    last = classify_pod(failed[-1], memory=memory) if failed else None
    if job_reason == "DeadlineExceeded":
        deadline = job.get("spec", {}).get("activeDeadlineSeconds")
        return Failure(
            FailureReason.DEADLINE_EXCEEDED,
            f"ran longer than spec.runPolicy.activeDeadlineSeconds={deadline}: raise it, or lower the steps",
        )
    if last is not None and last.reason in (
        FailureReason.BAD_INPUT,
        FailureReason.OUT_OF_MEMORY,
        FailureReason.OOM_KILLED,
    ):
        return last
    if job_reason == "BackoffLimitExceeded":
        tail = f"; last error: {last.message}" if last else ""
        return Failure(
            FailureReason.BACKOFF_LIMIT,
            f"the trainer failed {backoff_limit + 1} times (spec.runPolicy.backoffLimit={backoff_limit}){tail}",
        )
    if last is not None:
        return last
    return Failure(job_reason or FailureReason.JOB_FAILED, condition.get("message") or "the Job failed")


def waiting_problem(pod: dict[str, Any]) -> Failure | None:
    """A pod that cannot start: image pull or container config errors (the pod stays Pending)."""
    waiting = trainer_state(pod).get("waiting") or {}
    reason = waiting.get("reason", "")
    if reason in IMAGE_PULL_REASONS:
        return Failure(
            FailureReason.IMAGE_PULL_BACK_OFF, waiting.get("message") or f"cannot pull the trainer image ({reason})"
        )
    if reason in CONFIG_REASONS:
        return Failure(FailureReason(reason), waiting.get("message") or reason)
    return None


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message for a pod it cannot place, e.g. 'Insufficient nvidia.com/gpu'."""
    condition = has_condition(pod, "PodScheduled", "False")
    if condition and condition.get("reason") == "Unschedulable":
        return str(condition.get("message") or "no node can run the pod")
    return None


# Where a Job field the apiserver names comes from in the FineTuneJob, most specific first.
_JOB_FIELD_SOURCES = (
    ("spec.template.annotations", "spec"),
    ("spec.template.metadata.annotations", "spec"),
    ("spec.template.spec.tolerations", "spec.resources.tolerations"),
    ("spec.template.spec.affinity", "spec.resources.affinity"),
    ("spec.template.spec.nodeSelector", "spec.resources.nodeSelector"),
    ("spec.template.spec.priorityClassName", "spec.resources.priorityClassName"),
    ("spec.template.spec.containers[0].image", "spec.image"),
    ("spec.template.spec.containers[0].resources", "spec.resources"),
    ("spec.template.spec.volumes", "spec.baseModel.credentialsSecret or the pvc:// URIs"),
    ("spec.template.spec.containers[0].volumeMounts", "spec.baseModel.credentialsSecret or the pvc:// URIs"),
    ("spec.activeDeadlineSeconds", "spec.runPolicy.activeDeadlineSeconds"),
    ("spec.backoffLimit", "spec.runPolicy.backoffLimit"),
    ("metadata.labels", "spec.runPolicy.queueName"),
    ("spec.template.spec", "spec.resources"),
)


def rejected_fields(exc: Any) -> list[str]:
    """The FineTuneJob fields behind the Job fields an apiserver refusal names (``exc`` is a
    ``kubeapi.ApiError``: its causes, else its message)."""
    named = [str(c.get("field") or "") for c in exc.causes] or [str(exc.message)]
    fields: list[str] = []
    for text in named:
        for job_field, source in _JOB_FIELD_SOURCES:
            if job_field in text:
                if source not in fields:
                    fields.append(source)
                break
    return fields


def explain_rejection(exc: Any) -> str:
    """A Job the apiserver refused -> one sentence: the FineTuneJob field to fix, and the
    apiserver's own words."""
    fields = rejected_fields(exc)
    words = " ".join(str(exc.message or exc.reason).split())[:600]
    if "spec" in fields:
        # The pod template's annotations are ours alone (the job file): only their size can be wrong.
        return (
            "spec: the job file is too big to travel in the pod template (annotations hold at most 256 KiB): "
            "shorten spec.resources.affinity, spec.resources.tolerations or spec.samples.prompts "
            f"(the apiserver said: {words})"
        )
    where = " and ".join(fields) or "the spec"
    return f"{where}: the apiserver refused the Job ({words}); fix {where} and the Job is created again"
