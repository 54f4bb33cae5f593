"""FineTuneJobs sharing GPUs through a real Kueue (built from its Go module, webhooks on): quota,
queueing in Kueue's words, priorities and preemption, and suspension that never fights Kueue.

Every job trains the tiny pipeline for real through the operator and the node agent's GPU nodes
(1 + 2 nvidia.com/gpu): Kueue's quota, not the nodes, is what makes a job wait here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.test_lifecycle import PhaseRecorder, pod_logs
from tests.jobs import job_manifest, prepare_claims, trainer_processes
from tests.kube import BackgroundWatch, Kube, OperatorProcess, wait_for
from tests.queues import Queues, priority_class, workloads

pytestmark = pytest.mark.e2e

ONE_GPU = {"gpus": 1, "cpu": "1", "memory": "2Gi"}
FINAL = ("Succeeded", "Failed")


def queued_job(name: str, *, steps: int, every: int = 0, **run_policy: Any) -> dict[str, Any]:
    """A short one-GPU job in the LocalQueue ``gpu``; no preview samples (the slowest part on a CPU)."""
    return job_manifest(
        name,
        training={"maxSteps": steps},
        checkpoints={"everySteps": every, "keepLast": 20},
        samples={"prompts": [], "everySteps": 0},
        resources=ONE_GPU,
        runPolicy={"queueName": "gpu", **run_policy},
    )


def pod_times(kube: Kube, namespace: str, name: str) -> list[tuple[Any, Any]]:
    """(started, finished) of each terminated trainer container of one FineTuneJob."""
    out = []
    for pod in kube.pods(namespace, f"finetune.dev/job-name={name}"):
        for status in pod.status.container_statuses or []:
            ended = status.state.terminated
            if ended is not None:
                out.append((ended.started_at, ended.finished_at))
    return out


def events_of(kube: Kube, namespace: str, name: str) -> str:
    return kube.kubectl("-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={name}")


def metric(operator: OperatorProcess, name: str, **labels: str) -> float | None:
    """One sample of the operator's /metrics with exactly these labels."""
    for line in operator.metrics().splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        found = dict(part.split("=", 1) for part in series[len(name) + 1 : -1].split(","))
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return None


def test_two_gpus_of_quota_run_two_jobs_while_the_third_waits_in_kueues_words(
    kube: Kube, namespace: str, queues: Queues, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    queues.gpu_queue(namespace, gpus=2)
    for name in ("first", "second"):
        kube.create_ftj(namespace, queued_job(name, steps=100))
    for name in ("first", "second"):
        kube.wait_phase(namespace, name, "Initializing", "Training", timeout=180)
    kube.create_ftj(namespace, queued_job("third", steps=20))

    # The nodes have a third GPU free; Kueue's quota holds the third job.
    queued = wait_for(
        lambda: (
            (s := kube.status(namespace, "third")).get("phase") == "Queued" and s.get("queue", {}).get("position") and s
        ),
        timeout=60,
        what="third Queued by Kueue with its position",
    )
    running = {kube.status(namespace, n)["phase"] for n in ("first", "second")}
    assert not running & set(FINAL), f"a job ended before the check; make them longer: {running}"
    assert queued["reason"] == "Pending", queued
    assert queued["message"].startswith("Kueue: couldn't assign flavors to pod set main: ")
    assert "insufficient unused quota for nvidia.com/gpu" in queued["message"]
    assert queued["message"].endswith("; position 1 in LocalQueue gpu (1 in its ClusterQueue)")
    assert queued["queue"]["position"] == 1
    assert queued["queue"]["workload"].startswith("job-third-")
    assert not kube.pods(namespace, "finetune.dev/job-name=third")
    assert kube.batch.read_namespaced_job("third", namespace).spec.suspend is True
    printed = kube.kubectl("-n", namespace, "get", "ftj", "third", "-o", "wide")
    assert "Queued" in printed and "Pending" in printed
    # Which team waits: the operator's metrics by queue and phase.
    wait_for(
        lambda: metric(operator, "finetune_queue_jobs", namespace=namespace, queue="gpu", phase="Queued") == 1.0,
        timeout=30,
        what="one Queued job in finetune_queue_jobs",
    )

    statuses = {name: kube.wait_phase(namespace, name, *FINAL, timeout=900) for name in ("first", "second", "third")}
    assert {name: s["phase"] for name, s in statuses.items()} == dict.fromkeys(statuses, "Succeeded"), statuses
    # The third started only once one of the first two had ended.
    (third_start, _), *_ = pod_times(kube, namespace, "third")
    first_end = min(end for name in ("first", "second") for _, end in pod_times(kube, namespace, name))
    assert third_start >= first_end
    third = statuses["third"]
    assert third["queue"]["clusterQueue"] == f"{namespace}-gpus"
    assert "position" not in third["queue"]
    events = events_of(kube, namespace, "third")
    assert "Queued" in events and "admitted by Kueue to ClusterQueue" in events
    assert metric(operator, "finetune_queued_seconds_count", namespace=namespace, queue="gpu") == 3.0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors, f"no weights in {folder}"
    return tensors


def test_a_high_priority_job_preempts_a_low_one_that_resumes_to_the_same_weights(
    kube: Kube, namespace: str, queues: Queues, operator: OperatorProcess, tiny_assets: Path
) -> None:
    steps, every = 120, 20
    paths = prepare_claims(kube, namespace, tiny_assets)
    queues.gpu_queue(namespace, gpus=1, preempt=True)
    low_class = priority_class(kube, "finetune-test-low", 100)
    high_class = priority_class(kube, "finetune-test-high", 1000)
    # The same job never interrupted, outside Kueue, in a namespace of its own (the same name,
    # so the same file names), at the same time.
    reference_ns = f"{namespace[:50]}-ref"
    kube.create_namespace(reference_ns)
    try:
        reference = prepare_claims(kube, reference_ns, tiny_assets)
        plain = queued_job("low", steps=steps, every=every)
        del plain["spec"]["runPolicy"]
        kube.create_ftj(reference_ns, plain)
        # backoffLimit 0: a preemption that counted as a failure would fail the job.
        low = queued_job("low", steps=steps, every=every, priorityClass=low_class, backoffLimit=0)
        recorder = PhaseRecorder(kube, namespace, "low")
        try:
            kube.create_ftj(namespace, low)
            kube.wait_status(namespace, "low", lambda s: s.get("checkpoints"), timeout=300, what="a first checkpoint")
            kube.create_ftj(namespace, queued_job("high", steps=20, priorityClass=high_class))
            preempted = kube.wait_phase(namespace, "low", "Preempted", *FINAL, timeout=120)
            assert preempted["phase"] == "Preempted", f"low ended before the preemption; make it longer: {preempted}"
            assert preempted["reason"] == "Preempted"
            assert preempted["message"].startswith("preempted by Kueue: Preempted to accommodate a workload")
            assert "due to prioritization in the ClusterQueue" in preempted["message"]
            assert preempted["checkpoints"], "the checkpoints written before the preemption are on the resource"
            wait_for(lambda: not trainer_processes(namespace, "low"), timeout=90, what="low's trainer to stop")
            high = kube.wait_phase(namespace, "high", *FINAL, timeout=600)
            assert high["phase"] == "Succeeded", high
            status = kube.wait_phase(namespace, "low", *FINAL, timeout=900)
            time.sleep(0.5)  # the watch's last event
        finally:
            recorder.stop()
        assert status["phase"] == "Succeeded", status
        phases = recorder.phases
        assert "Preempted" in phases and phases.index("Training") < phases.index("Preempted"), phases
        assert "Training" in phases[phases.index("Preempted") :], phases
        assert status["attempts"] == 2
        assert status["progress"]["step"] == steps
        job = kube.batch.read_namespaced_job("low", namespace)
        assert (job.status.failed or 0) == 0  # the preemption used none of the retry budget
        assert "resuming from" in pod_logs(kube, namespace)
        assert "Preempted" in events_of(kube, namespace, "low")

        done = kube.wait_phase(reference_ns, "low", *FINAL, timeout=900)
        assert done["phase"] == "Succeeded", done
        assert "resuming from" not in pod_logs(kube, reference_ns)
        final = f"low/checkpoints/checkpoint-{steps:06d}"
        ours, theirs = _weights(paths["outputs"] / final), _weights(reference["outputs"] / final)
        assert ours.keys() == theirs.keys()
        for key in ours:  # full-precision training state
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
        exported, expected = (load_file(str(p["outputs"] / "low" / "low.safetensors")) for p in (paths, reference))
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[k], expected[k]) for k in exported)
    finally:
        kube.core.delete_namespace(reference_ns)


class SuspendRecorder:
    """Every value of the Job's spec.suspend, in order (repeats collapsed): one watch, resumed
    from the last resourceVersion it saw, so that no flip between two streams is missed."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.values: list[bool] = []

        def seen(job: Any) -> None:
            value = bool(job.spec.suspend)
            if not self.values or self.values[-1] != value:
                self.values.append(value)

        self._watch = BackgroundWatch(
            kube.batch.list_namespaced_job, namespace, field_selector=f"metadata.name={name}", on_event=seen
        )

    def stop(self) -> None:
        self._watch.stop()


def test_suspending_a_queued_job_deactivates_its_workload_and_nothing_fights(
    kube: Kube, namespace: str, queues: Queues, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    queues.gpu_queue(namespace, gpus=1)
    flips = SuspendRecorder(kube, namespace, "paused")
    try:
        kube.create_ftj(namespace, queued_job("paused", steps=120, every=20))
        kube.wait_status(namespace, "paused", lambda s: s.get("checkpoints"), timeout=300, what="a first checkpoint")
        kube.patch_ftj(namespace, "paused", {"spec": {"runPolicy": {"suspend": True}}})
        status = kube.wait_phase(namespace, "paused", "Suspended", *FINAL, timeout=60)
        assert status["phase"] == "Suspended", f"training ended before the suspension; make it longer: {status}"
        wait_for(lambda: not trainer_processes(namespace, "paused"), timeout=90, what="the trainer to stop")
        (workload,) = workloads(kube, namespace)
        assert workload["spec"]["active"] is False
        # Kueue released the quota and keeps the job out of the queue: another job runs on it,
        # while the suspended one stays suspended (Kueue does not unsuspend it, the operator
        # does not touch the Job's suspension).
        kube.create_ftj(namespace, queued_job("next", steps=20))
        done = kube.wait_phase(namespace, "next", *FINAL, timeout=600)
        assert done["phase"] == "Succeeded", done
        assert kube.status(namespace, "paused")["phase"] == "Suspended"
        assert flips.values == [True, False, True], flips.values

        kube.patch_ftj(namespace, "paused", {"spec": {"runPolicy": {"suspend": False}}})
        status = kube.wait_phase(namespace, "paused", *FINAL, timeout=900)
    finally:
        flips.stop()
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 120
    assert "resuming from" in pod_logs(kube, namespace)
    # Created suspended, admitted, suspended through Kueue, admitted again: no tug of war.
    assert flips.values == [True, False, True, False], flips.values
    job = kube.batch.read_namespaced_job("paused", namespace)
    assert (job.status.failed or 0) == 0
