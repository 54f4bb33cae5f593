"""(Job, Pods, progress) -> FineTuneJob status: pure, no cluster."""

from __future__ import annotations

import ast
import datetime as dt
import json
from pathlib import Path
from typing import Any

import finetune_operator
from finetune_api import parse_manifest
from finetune_api.report import ProgressEvent
from finetune_api.v1alpha1 import (
    CheckpointRef,
    DatasetStatus,
    EvaluationStatus,
    FailureReason,
    FineTuneJobStatus,
    OutputFile,
    Phase,
    Reason,
    Stage,
)
from finetune_operator.render import ClaimMount
from finetune_operator.status import (
    EXPORTING_STAGES,
    STAGE_REASONS,
    TRAINING_STAGES,
    Observed,
    compute_status,
    format_duration,
    status_patch,
    with_phase,
)
from tests.bad_specs import good_manifest

SPEC = parse_manifest(good_manifest()).spec
MOUNTS = (ClaimMount("outputs", "/data/outputs", False),)


def job(*, suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "good"},
        "spec": {"suspend": suspend, "activeDeadlineSeconds": 600},
        "status": {"conditions": conditions or [], **status},
    }


def pod(
    name: str = "good-abc",
    *,
    phase: str = "Running",
    created: str = "2026-01-01T00:00:00Z",
    node: str | None = "gpu-node-1",
    state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": name + "-uid", "creationTimestamp": created},
        "spec": {"nodeName": node},
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [{"name": "trainer", "state": state or {}}],
        },
    }


def terminated(code: int, message: str = "", reason: str = "Error") -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "message": message, "reason": reason}}


def event(stage: str = "training", step: int = 10, total: int = 100, attempt: str = "good-abc") -> ProgressEvent:
    return ProgressEvent.model_validate(
        {
            "seq": step,
            "attempt": attempt,
            "time": "2026-01-01T00:01:00Z",
            "stage": stage,
            "step": step,
            "totalSteps": total,
            "loss": 0.1234567,
            "learningRate": 2e-6,
            "stepsPerSecond": 2.5,
            "etaSeconds": 36,
            "checkpoints": [{"step": 10, "uri": "/data/outputs/good/checkpoints/checkpoint-000010", "sizeBytes": 5}],
        }
    )


def status_of(observed: Observed, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    return compute_status(previous, SPEC, observed, generation=1, job_name="good", mounts=MOUNTS).status


def test_new_job_is_pending_with_conditions() -> None:
    status = status_of(Observed(job=job()))
    assert status["phase"] == "Pending"
    assert status["jobName"] == "good"
    assert status["observedGeneration"] == 1
    created = next(c for c in status["conditions"] if c["type"] == "Created")
    assert created["status"] == "True"


def test_unschedulable_pod_is_queued_with_the_schedulers_words() -> None:
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    unschedulable = pod(
        phase="Pending",
        node=None,
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    )
    status = status_of(Observed(job=job(active=1), pods=[unschedulable]))
    assert status["phase"] == "Queued"
    assert status["reason"] == "Unschedulable"
    assert status["message"] == message


def test_image_pull_problem_is_named() -> None:
    stuck = pod(phase="Pending", state={"waiting": {"reason": "ImagePullBackOff", "message": "no such image x:1"}})
    status = status_of(Observed(job=job(active=1), pods=[stuck]))
    assert (status["phase"], status["reason"]) == ("Initializing", "ImagePullBackOff")
    assert "no such image" in status["message"]


def test_training_progress_fills_status_and_printer_columns() -> None:
    status = status_of(Observed(job=job(active=1), pods=[pod()], progress=event()))
    assert status["phase"] == "Training"
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (10, 100, 10.0)
    assert progress["loss"] == 0.123457
    assert status["progressText"] == "10/100 (10%)"
    assert status["etaText"] == "36s"
    assert status["checkpoints"][0]["uri"] == "pvc://outputs/good/checkpoints/checkpoint-000010"


def test_what_the_trainer_found_in_the_dataset_reaches_status() -> None:
    found = {
        "layout": "kohya",
        "images": 12,
        "concepts": [
            {"name": "sks dog", "images": 12, "repeats": 10, "captioned": 6, "classImages": 0, "prompt": "sks dog"}
        ],
        "buckets": [{"width": 512, "height": 512, "images": 12}],
        "captionCoverage": 50.0,
    }
    progress = event().model_copy(update={"dataset": DatasetStatus.model_validate(found)})
    status = status_of(Observed(job=job(active=1), pods=[pod()], progress=progress))
    assert status["dataset"] == found


def test_checkpoint_scores_and_the_best_checkpoint_reach_status() -> None:
    progress = event().model_copy(
        update={
            "checkpoints": [
                CheckpointRef(step=2, uri="/data/outputs/good/checkpoints/checkpoint-000002", scores={"dino": 0.7}),
                CheckpointRef(step=4, uri="/data/outputs/good/checkpoints/checkpoint-000004", scores={"dino": 0.6}),
            ],
            "evaluation": EvaluationStatus(rule="highest dino", best_step=2, best_scores={"dino": 0.7}, seconds=3.5),
        }
    )
    status = status_of(Observed(job=job(active=1), pods=[pod()], progress=progress))
    assert [c["scores"] for c in status["checkpoints"]] == [{"dino": 0.7}, {"dino": 0.6}]
    assert status["evaluation"] == {
        "rule": "highest dino",
        "bestStep": 2,
        "bestScores": {"dino": 0.7},
        "seconds": 3.5,
    }


def test_progress_of_an_earlier_attempt_is_not_the_current_state() -> None:
    status = status_of(Observed(job=job(active=1), pods=[pod("good-new")], progress=event(attempt="good-old")))
    assert status["phase"] == "Initializing"


def test_success_uses_the_termination_summary_when_no_final_report_arrived() -> None:
    summary = {
        "phase": "Succeeded",
        "step": 100,
        "totalSteps": 100,
        "outputUri": "/data/outputs/good",
        "files": [{"path": "model.safetensors", "sizeBytes": 10, "sha256": "ab" * 32}],
    }
    done = pod(phase="Succeeded", state=terminated(0, json.dumps(summary), "Completed"))
    complete = job(
        succeeded=1,
        completionTime="2026-01-01T01:00:00Z",
        conditions=[{"type": "Complete", "status": "True"}],
    )
    status = status_of(Observed(job=complete, pods=[done], progress=event(step=40)))
    assert status["phase"] == "Succeeded"
    assert status["progress"]["step"] == 100
    assert status["progress"]["percent"] == 100.0
    assert status["output"]["uri"] == "pvc://outputs/good"
    assert status["output"]["files"][0]["sha256"] == "ab" * 32
    assert status["completionTime"] == "2026-01-01T01:00:00Z"
    assert "etaText" not in status


def test_bad_input_fails_with_the_trainers_message() -> None:
    summary = {"phase": "Failed", "reason": "BadInput", "message": "spec.dataset.instanceImages: no images in /x"}
    failed_pod = pod(phase="Failed", state=terminated(2, json.dumps(summary)))
    failed = job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    status = status_of(Observed(job=failed, pods=[failed_pod]))
    assert (status["phase"], status["reason"]) == ("Failed", "BadInput")
    assert status["message"] == "spec.dataset.instanceImages: no images in /x"
    assert status["attempts"] == 1


def test_backoff_limit_names_the_setting_and_the_last_error() -> None:
    pods = [
        pod(f"good-{i}", phase="Failed", created=f"2026-01-01T00:0{i}:00Z", state=terminated(1, f"boom {i}"))
        for i in range(4)
    ]
    failed = job(failed=4, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    status = status_of(Observed(job=failed, pods=pods))
    assert status["reason"] == "BackoffLimit"
    assert "backoffLimit=3" in status["message"]
    assert "boom 3" in status["message"]
    assert status["attempts"] == 4


def test_deadline_exceeded_names_the_setting() -> None:
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}])
    status = status_of(Observed(job=failed, pods=[]))
    assert status["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=600" in status["message"]


def test_out_of_memory_is_its_own_reason() -> None:
    summary = {"phase": "Failed", "reason": "OutOfMemory", "message": "CUDA out of memory: set gradientCheckpointing"}
    failed_pod = pod(phase="Failed", state=terminated(3, json.dumps(summary)))
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    assert status_of(Observed(job=failed, pods=[failed_pod]))["reason"] == "OutOfMemory"


def test_disrupted_pod_is_retried_not_failed() -> None:
    evicted = pod(
        phase="Failed",
        state=terminated(143),
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    )
    status = status_of(Observed(job=job(), pods=[evicted], seen_pods=1))
    assert status["phase"] == "Pending"
    assert status["reason"] == "Retrying"
    assert "Evicted" in status["message"]


def test_suspend_shows_suspended() -> None:
    manifest = good_manifest()
    manifest["spec"]["runPolicy"] = {"suspend": True}
    spec = parse_manifest(manifest).spec
    result = compute_status({"phase": "Training"}, spec, Observed(job=job(suspend=True)), generation=2, job_name="good")
    assert result.status["phase"] == "Suspended"
    assert [e.reason for e in result.events] == ["Suspended"]


def test_resume_leaves_suspended_at_once() -> None:
    previous = {
        "phase": "Suspended",
        "jobName": "good",
        "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": ""}],
    }
    status = status_of(Observed(job=job(suspend=False)), previous=previous)
    assert status["phase"] == "Pending"
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "False"


def test_final_phase_is_never_overwritten() -> None:
    final = {"phase": "Succeeded", "reason": "Completed", "jobName": "good"}
    result = compute_status(final, SPEC, Observed(job=None, job_missing_confirmed=True), generation=1, job_name="good")
    assert result.status == final
    assert result.events == []


def test_a_deleted_job_of_a_running_finetunejob_is_reported_not_recreated() -> None:
    status = status_of(
        Observed(job=None, job_missing_confirmed=True), previous={"phase": "Training", "jobName": "good"}
    )
    assert (status["phase"], status["reason"]) == ("Failed", "JobDeleted")


def test_one_event_per_transition_and_none_for_creation() -> None:
    first = compute_status(None, SPEC, Observed(job=job()), generation=1, job_name="good")
    assert first.status["phase"] == "Pending"
    assert first.events == []
    running = Observed(job=job(active=1), pods=[pod()])
    started = compute_status(first.status, SPEC, running, generation=1, job_name="good")
    assert [e.reason for e in started.events] == ["Initializing"]
    again = compute_status(started.status, SPEC, running, generation=1, job_name="good")
    assert again.events == []


def test_status_patch_is_a_merge_of_what_changed() -> None:
    old = {"phase": "Training", "progress": {"step": 1, "etaSeconds": 9}, "jobName": "x"}
    new = {"phase": "Training", "progress": {"step": 2}, "jobName": "x"}
    assert status_patch(old, new) == {"progress": {"step": 2, "etaSeconds": None}}
    assert status_patch(new, new) == {}


def test_durations_read_like_kubectl() -> None:
    assert format_duration(36) == "36s"
    assert format_duration(200) == "3m20s"
    assert format_duration(7300) == "2h01m"


def test_at_the_end_the_termination_summary_is_the_record_not_a_report() -> None:
    """A report that says done (it may have come late, or from someone holding the pod's token)
    cannot change the output folder or a file's hash that the trainer's summary records."""
    summary = {
        "phase": "Succeeded",
        "step": 100,
        "totalSteps": 100,
        "outputUri": "/data/outputs/good",
        "files": [{"path": "good.safetensors", "sizeBytes": 10, "sha256": "ab" * 32}],
    }
    done = pod(phase="Succeeded", state=terminated(0, json.dumps(summary), "Completed"))
    complete = job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    forged = event(stage="done", step=100).model_copy(
        update={
            "output_uri": "/data/outputs/elsewhere",
            "files": [
                OutputFile(path="good.safetensors", size_bytes=66, sha256="ee" * 32),
                OutputFile(path="diffusers/model_index.json", size_bytes=5, sha256="cd" * 32),
            ],
        }
    )
    status = status_of(Observed(job=complete, pods=[done], progress=forged))
    assert status["phase"] == "Succeeded"
    assert status["output"]["uri"] == "pvc://outputs/good"
    files = {f["path"]: f for f in status["output"]["files"]}
    assert files["good.safetensors"] == {"path": "good.safetensors", "sizeBytes": 10, "sha256": "ab" * 32}
    # What the summary had no room for (files inside folders) still shows.
    assert files["diffusers/model_index.json"]["sha256"] == "cd" * 32


def test_messages_and_uris_on_the_resource_carry_no_credentials() -> None:
    secret_uri = "https://nick:hunter2@models.example.com/sd.safetensors?X-Amz-Signature=deadbeef"
    message = f"cannot read {secret_uri}: 403 Forbidden"
    summary = {"phase": "Failed", "reason": "BadInput", "message": message}
    failed = pod(phase="Failed", state=terminated(2, json.dumps(summary)))
    ended = job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    result = compute_status(None, SPEC, Observed(job=ended, pods=[failed]), generation=1, job_name="good")
    shown = json.dumps(result.status) + json.dumps([e.message for e in result.events])
    assert "models.example.com/sd.safetensors" in result.status["message"]
    assert "hunter2" not in shown and "X-Amz-Signature" not in shown and "nick:" not in shown

    report = event().model_copy(
        update={"checkpoints": [], "output_uri": "s3://bucket/out?versionId=7", "warnings": [f"slow: {secret_uri}"]}
    )
    status = status_of(Observed(job=job(active=1), pods=[pod()], progress=report))
    assert status["output"]["uri"] == "s3://bucket/out"
    assert "hunter2" not in json.dumps(status) and "deadbeef" not in json.dumps(status)


# --- the wire form ------------------------------------------------------------------------------

NOW = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.UTC)
STAMP = "2026-01-01T02:00:00Z"


def full_report(**fields: Any) -> ProgressEvent:
    body = {
        "seq": 10,
        "attempt": "good-abc",
        "time": "2026-01-01T00:01:00Z",
        "stage": "training",
        "step": 10,
        "totalSteps": 1000,
        "loss": 0.1234567,
        "learningRate": 2e-6,
        "stepsPerSecond": 2.5,
        "etaSeconds": 360,
        "peakMemoryBytes": 123456,
        "checkpoints": [
            {"step": 100, "uri": "/data/outputs/good/checkpoints/checkpoint-000100", "sizeBytes": 5, "time": STAMP},
            {"step": 200, "uri": "s3://bucket/good/checkpoint-000200?X-Amz-Signature=1", "sizeBytes": None},
        ],
        "outputUri": "/data/outputs/good",
        "files": [{"path": "a.safetensors", "sizeBytes": 1, "sha256": "ab" * 32}],
        "samples": ["/data/outputs/good/samples/s1.png"],
        "warnings": ["xformers is missing: sdpa instead"],
        # What the trainer leaves out shows as the model's default.
        "dataset": {"layout": "folder", "images": 10, "concepts": [{"name": "sks", "images": 10}]},
    }
    body.update(fields)
    return ProgressEvent.model_validate(body)


def test_a_new_finetunejob_is_written_with_its_phase_reason_and_generation_only() -> None:
    result = compute_status(None, SPEC, Observed(job=None), generation=1, job_name="good", now=NOW)
    assert result.status == {
        "phase": "Pending",
        "reason": "Creating",
        "message": "creating the training Job",
        "observedGeneration": 1,
        "conditions": [],
    }
    assert json.dumps(result.status) == json.dumps(result.status, default=lambda o: "not JSON")


def test_a_training_report_is_written_in_the_apis_field_names_leaving_out_what_is_unset() -> None:
    previous = {
        "phase": "Initializing",
        "reason": "TrainerStarting",
        "message": "the trainer is starting",
        "observedGeneration": 1,
        "jobName": "good",
        "attempts": 1,
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [
            {"type": "Created", "status": "True", "reason": "JobCreated", "message": "created Job good",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Running", "status": "True", "reason": "TrainerStarting",
             "message": "the trainer is starting", "lastTransitionTime": "2026-01-01T00:00:10Z"},
        ],
    }  # fmt: skip
    observed = Observed(job=job(active=1, startTime="2026-01-01T00:00:00Z"), pods=[pod()], progress=full_report())
    result = compute_status(previous, SPEC, observed, generation=1, job_name="good", mounts=MOUNTS, now=NOW)
    assert result.status == {
        "phase": "Training",
        "reason": "Training",
        "message": "training (training)",
        "observedGeneration": 1,
        "jobName": "good",
        "attempts": 1,
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [
            {"type": "Created", "status": "True", "reason": "JobCreated", "message": "created Job good",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Running", "status": "True", "reason": "Training", "message": "training (training)",
             "lastTransitionTime": "2026-01-01T00:00:10Z"},
        ],
        "progress": {
            "stage": "training",
            "step": 10,
            "totalSteps": 1000,
            "percent": 1.0,
            "loss": 0.123457,
            "learningRate": 2e-6,
            "stepsPerSecond": 2.5,
            "etaSeconds": 360,
            "peakMemoryBytes": 123456,
            "updateTime": "2026-01-01T00:01:00Z",
        },
        "progressText": "10/1000 (1%)",
        "etaText": "6m00s",
        "checkpoints": [
            {"step": 100, "uri": "pvc://outputs/good/checkpoints/checkpoint-000100", "sizeBytes": 5, "time": STAMP},
            {"step": 200, "uri": "s3://bucket/good/checkpoint-000200"},
        ],
        "output": {
            "uri": "pvc://outputs/good",
            "files": [{"path": "a.safetensors", "sizeBytes": 1, "sha256": "ab" * 32}],
            "samples": ["pvc://outputs/good/samples/s1.png"],
        },
        "warnings": ["xformers is missing: sdpa instead"],
        "dataset": {
            "layout": "folder",
            "images": 10,
            "concepts": [
                {"name": "sks", "images": 10, "repeats": 1, "captioned": 0, "classImages": 0, "prompt": ""}
            ],
            "buckets": [],
            "captionCoverage": 0.0,
        },
    }  # fmt: skip
    assert [(e.type, e.reason, e.message) for e in result.events] == [
        ("Normal", "Training", "Training: training (training)")
    ]
    # What is written reads back through the model unchanged.
    assert (
        FineTuneJobStatus.model_validate(result.status).model_dump(
            mode="json", by_alias=True, exclude_unset=True, exclude_none=True
        )
        == result.status
    )

    # Before the first step again (a resumed run): only what changed is patched, and the
    # display-only ETA goes.
    caching = full_report(stage="caching", checkpoints=[], files=[], samples=[], outputUri=None, warnings=[])
    again = compute_status(
        result.status, SPEC, Observed(job=job(active=1), pods=[pod()], progress=caching),
        generation=1, job_name="good", mounts=MOUNTS, now=NOW,
    )  # fmt: skip
    assert status_patch(result.status, again.status) == {
        "phase": "Initializing",
        "reason": "Caching",
        "message": "caching",
        "progress": {"stage": "caching"},
        "etaText": None,
        "conditions": [
            {"type": "Created", "status": "True", "reason": "JobCreated", "message": "created Job good",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Running", "status": "True", "reason": "Caching", "message": "caching",
             "lastTransitionTime": "2026-01-01T00:00:10Z"},
        ],
    }  # fmt: skip


def test_the_end_is_written_from_the_trainers_summary() -> None:
    running = compute_status(
        None, SPEC, Observed(job=job(active=1), pods=[pod()], progress=full_report()),
        generation=1, job_name="good", mounts=MOUNTS, now=NOW,
    ).status  # fmt: skip
    summary = {
        "phase": "Succeeded",
        "step": 1000,
        "totalSteps": 1000,
        "outputUri": "/data/outputs/good",
        "files": [{"path": "b.safetensors", "sizeBytes": 2, "sha256": "cd" * 32}],
    }
    done = pod(phase="Succeeded", state=terminated(0, json.dumps(summary), "Completed"))
    complete = job(succeeded=1, conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": STAMP}])
    ended = compute_status(
        running, SPEC, Observed(job=complete, pods=[done], progress=full_report(step=990)),
        generation=1, job_name="good", mounts=MOUNTS, now=NOW,
    )  # fmt: skip
    patch = status_patch(running, ended.status)
    assert patch["progress"] == {
        "step": 1000,
        "percent": 100.0,
        "stage": "done",
        "etaSeconds": 0,
        "loss": None,
        "learningRate": None,
        "stepsPerSecond": None,
        "peakMemoryBytes": None,
        "updateTime": None,
    }
    assert patch["output"] == {
        "files": [{"path": "b.safetensors", "sizeBytes": 2, "sha256": "cd" * 32}],
        "samples": None,
    }
    assert (patch["phase"], patch["reason"], patch["completionTime"], patch["etaText"]) == (
        "Succeeded",
        "Completed",
        STAMP,
        None,
    )
    assert patch["progressText"] == "1000/1000 (100%)"


def test_a_field_the_model_does_not_know_is_kept_and_a_field_that_no_longer_applies_goes() -> None:
    previous = {
        "phase": "Queued",
        "reason": "Pending",
        "message": "Kueue: waiting",
        "jobName": "good",
        "queue": {"name": "team-a", "workload": "job-good-1", "position": 2, "positionInClusterQueue": 5},
        "writtenByANewerOperator": {"x": 1},
    }
    status = status_of(Observed(job=job(active=1), pods=[pod()]), previous=previous)
    assert status["writtenByANewerOperator"] == {"x": 1}
    assert "queue" not in status
    assert status_patch(previous, status)["queue"] is None


def test_a_phase_set_before_any_job_exists_goes_through_the_model_and_keeps_the_rest() -> None:
    previous = {
        "phase": "Pending",
        "reason": "JobCreated",
        "jobName": "good",
        "attempts": 1,
        "progress": {"stage": "training", "step": 10, "totalSteps": 100},
        "writtenByANewerOperator": {"x": 1},
    }
    status = with_phase(previous, Phase.PENDING, Reason.JOB_REJECTED, "x" * 5000, generation=3)
    assert status == {
        **previous,
        "reason": "JobRejected",
        "message": "x" * 1000,
        "observedGeneration": 3,
    }
    assert json.loads(json.dumps(status)) == status
    first = with_phase(None, Phase.FAILED, FailureReason.INVALID_SPEC, "spec.steps: must be > 0")
    assert first == {"phase": "Failed", "reason": "InvalidSpec", "message": "spec.steps: must be > 0"}
    assert type(first["phase"]) is str


# --- one vocabulary -----------------------------------------------------------------------------

OPERATOR = Path(finetune_operator.__file__).parent
# Where a reason or a phase is written: the positional argument of each constructor.
REASON_ARGUMENT = {"Decision": 1, "KueueState": 1, "Transition": 1, "Failure": 0, "with_phase": 2}
PHASE_ARGUMENT = {"Decision": 0, "KueueState": 0, "with_phase": 1}


def _spelled_out(node: ast.AST | None) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def literal_reasons_and_phases(source: str) -> list[tuple[int, str]]:
    """(line, code) of each place ``source`` writes a reason or a phase as a string of its own
    rather than a member of Reason, FailureReason or Phase."""
    found: list[tuple[int, str]] = []

    def flag(node: ast.AST) -> None:
        found.append((getattr(node, "lineno", 0), ast.unparse(node)))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            for table in (REASON_ARGUMENT, PHASE_ARGUMENT):
                index = table.get(name)
                if index is not None and index < len(node.args) and _spelled_out(node.args[index]):
                    flag(node)
            if any(k.arg in ("reason", "phase") and _spelled_out(k.value) for k in node.keywords):
                flag(node)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in ("reason", "phase") and _spelled_out(value):
                    flag(node)
        elif isinstance(node, ast.Assign):
            named = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if any(n in ("reason", "phase") for n in named) and _spelled_out(node.value):
                flag(node)
        elif isinstance(node, ast.Tuple) and len(node.elts) == 3:
            # An Event: (type, reason, message).
            kind = node.elts[0]
            if isinstance(kind, ast.Constant) and kind.value in ("Normal", "Warning") and _spelled_out(node.elts[1]):
                flag(node)
    return sorted(found)


def test_the_scan_finds_a_reason_or_phase_spelled_out() -> None:
    source = """
Decision(Phase.FAILED, "JobDeleted", "gone")
Decision("Failed", Reason.CREATING, "x")
Failure(f"{kind}Error", "x")
status = {"phase": "Pending", "reason": Reason.CREATING}
reason = "NameConflict"
events = [("Warning", "NameConflict", message)]
post_event(body, type="Warning", reason="Oops", message="")
"""
    assert [line for line, _ in literal_reasons_and_phases(source)] == [2, 3, 4, 5, 6, 7, 8]
    assert literal_reasons_and_phases('Decision(Phase.FAILED, FailureReason.JOB_DELETED, "gone")') == []


def test_every_reason_and_phase_the_operator_writes_is_a_member_of_the_vocabulary() -> None:
    spelled_out = [
        f"{path.relative_to(OPERATOR)}:{line}: {code}"
        for path in sorted(OPERATOR.rglob("*.py"))
        # The local cluster's node agent writes pods' phases and reasons, not a FineTuneJob's.
        if "devcluster" not in path.relative_to(OPERATOR).parts
        for line, code in literal_reasons_and_phases(path.read_text())
    ]
    assert spelled_out == []
    # Before the first step the reason is the trainer's stage: each stage has its member.
    before_training = set(Stage) - TRAINING_STAGES - EXPORTING_STAGES
    assert set(STAGE_REASONS) == before_training
    assert all(isinstance(reason, Reason) for reason in STAGE_REASONS.values())


def test_the_reasons_of_the_scenarios_above_are_members() -> None:
    vocabulary = {*Reason, *FailureReason}
    for failed_pod, condition in (
        (pod(phase="Failed", state=terminated(2, json.dumps({"phase": "Failed"}))), "PodFailurePolicy"),
        (pod(phase="Failed", state=terminated(137, "", "OOMKilled")), "PodFailurePolicy"),
        (pod(phase="Failed", state=terminated(1, "boom")), "BackoffLimitExceeded"),
        (pod(phase="Failed", state=terminated(1, "boom")), "DeadlineExceeded"),
    ):  # fmt: skip
        ended = job(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": condition}])
        status = status_of(Observed(job=ended, pods=[failed_pod]))
        assert status["phase"] in set(Phase) and status["reason"] in vocabulary
        assert {c["reason"] for c in status["conditions"]} <= vocabulary
    for stage in Stage:
        status = status_of(Observed(job=job(active=1), pods=[pod()], progress=event(stage=stage.value)))
        assert status["phase"] in set(Phase) and status["reason"] in vocabulary
