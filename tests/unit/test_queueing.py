"""Kueue's Workload -> the FineTuneJob's phase, reason, message and status.queue: pure, no
cluster.  The conditions below are as Kueue v0.17 writes them (copied from a real run)."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api import parse_manifest
from finetune_operator import queueing
from finetune_operator.queueing import Position
from finetune_operator.status import Observed, compute_status
from tests.bad_specs import good_manifest

JOB_UID = "83e484c1-9668-4e11-977c-0342d1acc6c9"
NO_QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
    "default-flavor, 1 more needed"
)
PREEMPTED = (
    "Preempted to accommodate a workload (UID: 7e8136ca, JobUID: e18fe846) due to prioritization in the "
    "ClusterQueue; preemptor path: /gpus; preemptee path: /gpus"
)


def spec(**run_policy: Any) -> Any:
    manifest = good_manifest()
    manifest["spec"]["runPolicy"] = {"queueName": "gpu", **run_policy}
    return parse_manifest(manifest).spec


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": "t"}


def workload(*conditions: dict[str, Any], active: bool = True, cluster_queue: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "name": "job-good-c81c6",
            "namespace": "team-a",
            "creationTimestamp": "2026-11-30T00:25:32Z",
            "ownerReferences": [{"kind": "Job", "name": "good", "uid": JOB_UID}],
        },
        "spec": {"active": active, "queueName": "gpu"},
        "status": {"conditions": list(conditions)},
    }
    if cluster_queue:
        body["status"]["admission"] = {"clusterQueue": cluster_queue}
    return body


PENDING = workload(cond("QuotaReserved", "False", "Pending", NO_QUOTA))
ADMITTED = workload(
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
    cluster_queue="gpus",
)
# A minute after the preemption: the scheduler has tried again and says why it waits.
PREEMPTED_WAITING = workload(
    cond("QuotaReserved", "False", "Pending", NO_QUOTA),
    cond("Evicted", "True", "Preempted", PREEMPTED),
    cond("Admitted", "False", "NoReservation", "The workload has no reservation"),
    cond("Preempted", "True", "InClusterQueue", PREEMPTED),
    cond("Requeued", "True", "Preempted", PREEMPTED),
)
# What runPolicy.suspend does: the operator deactivates the Workload.
DEACTIVATED = workload(
    cond("QuotaReserved", "False", "Pending", "The workload is deactivated"),
    cond("Evicted", "True", "Deactivated", "The workload is deactivated"),
    cond("Requeued", "False", "Deactivated", "The workload is deactivated"),
    active=False,
)


def job(*, suspend: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": "good", "uid": JOB_UID}, "spec": {"suspend": suspend}, "status": {}}


def status_of(
    observed: Observed, previous: dict[str, Any] | None = None, **run_policy: Any
) -> tuple[dict[str, Any], list[Any]]:
    result = compute_status(previous, spec(**run_policy), observed, generation=1, job_name="good")
    return result.status, result.events


def test_waiting_for_quota_is_queued_in_kueues_words_with_the_position() -> None:
    status, events = status_of(Observed(job=job(), workload=PENDING, position=Position(2, 3)))
    assert (status["phase"], status["reason"]) == ("Queued", "Pending")
    assert status["message"] == f"Kueue: {NO_QUOTA}; position 2 in LocalQueue gpu (3 in its ClusterQueue)"
    assert status["queue"] == {
        "name": "gpu",
        "workload": "job-good-c81c6",
        "position": 2,
        "positionInClusterQueue": 3,
    }
    assert [(e.reason, e.message) for e in events] == [("Queued", f"Queued: {status['message']}")]
    queued = next(c for c in status["conditions"] if c["type"] == "Queued")
    assert (queued["status"], queued["reason"]) == ("True", "Pending")


def test_without_the_pending_workloads_api_the_message_is_kueues_alone() -> None:
    status, _ = status_of(Observed(job=job(), workload=PENDING))
    assert status["message"] == f"Kueue: {NO_QUOTA}"
    assert "position" not in status["queue"]


def test_an_inadmissible_workload_says_why_in_kueues_words() -> None:
    missing = workload(cond("QuotaReserved", "False", "Inadmissible", "LocalQueue gpu doesn't exist"))
    status, _ = status_of(Observed(job=job(), workload=missing))
    assert (status["phase"], status["reason"], status["message"]) == (
        "Queued",
        "Inadmissible",
        "Kueue: LocalQueue gpu doesn't exist",
    )


def test_before_kueue_makes_the_workload_the_job_waits_for_it() -> None:
    status, _ = status_of(Observed(job=job(), workload=None))
    assert (status["phase"], status["reason"]) == ("Queued", "WaitingForAdmission")
    assert "LocalQueue gpu" in status["message"] and "batch/job integration" in status["message"]


def test_admitted_is_initializing_with_an_event_and_the_cluster_queue() -> None:
    queued, _ = status_of(Observed(job=job(), workload=PENDING, position=Position(1, 1)))
    # Kueue has admitted the Workload; it unsuspends the Job a moment later.
    status, events = status_of(Observed(job=job(), workload=ADMITTED), previous=queued)
    assert (status["phase"], status["reason"]) == ("Initializing", "Admitted")
    assert status["message"] == "admitted by Kueue to ClusterQueue gpus (Kueue: The workload is admitted)"
    assert status["queue"] == {"name": "gpu", "workload": "job-good-c81c6", "clusterQueue": "gpus"}
    assert [e.reason for e in events] == ["Initializing"]
    # Unsuspended, the pod not yet made: still Initializing, not back to Pending.
    status, events = status_of(Observed(job=job(suspend=False), workload=ADMITTED), previous=status)
    assert (status["phase"], status["reason"]) == ("Initializing", "Admitted")
    assert events == []


def test_preempted_shows_kueues_reason_and_what_happens_next() -> None:
    running = {"phase": "Training", "reason": "Training", "message": "training", "progress": {"step": 120}}
    status, events = status_of(Observed(job=job(), workload=PREEMPTED_WAITING), previous=running)
    assert (status["phase"], status["reason"]) == ("Preempted", "Preempted")
    assert status["message"].startswith(f"preempted by Kueue: {PREEMPTED}; waiting to be admitted again. Kueue: ")
    assert NO_QUOTA in status["message"] and "newest checkpoint" in status["message"]
    assert status["progress"]["step"] == 120  # what it had done stays on the resource
    assert [(e.type, e.reason) for e in events] == [("Warning", "Preempted")]
    # Admitted again: Initializing, and on from there.
    again = workload(*ADMITTED["status"]["conditions"], cond("Requeued", "True", "Preempted", PREEMPTED))
    again["status"]["admission"] = {"clusterQueue": "gpus"}
    status, _ = status_of(Observed(job=job(suspend=False), workload=again), previous=status)
    assert (status["phase"], status["reason"]) == ("Initializing", "Admitted")


def test_right_after_the_preemption_the_message_is_not_said_twice() -> None:
    fresh = copy.deepcopy(PREEMPTED_WAITING)
    fresh["status"]["conditions"][0] = cond("QuotaReserved", "False", "Pending", PREEMPTED)
    status, _ = status_of(Observed(job=job(), workload=fresh))
    assert status["message"].count("Preempted to accommodate") == 1


def test_a_suspended_finetunejob_is_suspended_not_evicted() -> None:
    status, _ = status_of(Observed(job=job(), workload=DEACTIVATED), suspend=True)
    assert (status["phase"], status["reason"]) == ("Suspended", "Suspended")
    # Resumed: the Workload is active again but Kueue has not looked yet; the eviction for
    # deactivation is ours, not news.
    status, _ = status_of(Observed(job=job(), workload=DEACTIVATED))
    assert status["phase"] == "Queued"
    assert "Deactivated" not in status["reason"]


def test_another_eviction_is_queued_with_kueues_reason() -> None:
    stopped = workload(
        cond("QuotaReserved", "False", "Pending", "The ClusterQueue is stopped"),
        cond("Evicted", "True", "ClusterQueueStopped", "The ClusterQueue is stopped"),
    )
    status, _ = status_of(Observed(job=job(), workload=stopped))
    assert (status["phase"], status["reason"]) == ("Queued", "ClusterQueueStopped")
    assert status["message"] == "evicted by Kueue: The ClusterQueue is stopped"


def test_the_workload_is_the_one_the_job_owns() -> None:
    other = copy.deepcopy(ADMITTED)
    other["metadata"]["ownerReferences"][0]["uid"] = "an-earlier-job"
    assert queueing.workload_of(job(), [other, PENDING]) == PENDING
    assert queueing.workload_of(job(), [other]) is None
    assert queueing.workload_of(None, [PENDING]) is None


def test_positions_count_from_one_for_people() -> None:
    summary = {
        "items": [
            {"metadata": {"name": "job-a"}, "positionInLocalQueue": 0, "positionInClusterQueue": 0},
            {"metadata": {"name": "job-good-c81c6"}, "positionInLocalQueue": 1, "positionInClusterQueue": 4},
        ]
    }
    assert queueing.position_in(summary, "job-good-c81c6") == Position(2, 5)
    assert queueing.position_in(summary, "job-gone") is None


def test_only_a_workload_waiting_for_quota_has_a_position() -> None:
    assert queueing.waiting_for_quota(PENDING)
    assert queueing.waiting_for_quota(PREEMPTED_WAITING)
    assert not queueing.waiting_for_quota(ADMITTED)
    assert not queueing.waiting_for_quota(DEACTIVATED)
    assert not queueing.waiting_for_quota(None)


def test_without_a_queue_name_there_is_no_queue_status() -> None:
    manifest = good_manifest()
    result = compute_status(
        {"queue": {"name": "gone"}},
        parse_manifest(manifest).spec,
        Observed(job=job(suspend=False)),
        generation=1,
        job_name="good",
    )
    assert "queue" not in result.status


def test_waiting_since_is_when_quota_reservation_turned_false() -> None:
    import datetime as dt

    pending = copy.deepcopy(PENDING)
    pending["status"]["conditions"][0]["lastTransitionTime"] = "2026-11-30T00:25:32Z"
    assert queueing.waiting_since(pending) == dt.datetime(2026, 11, 30, 0, 25, 32, tzinfo=dt.UTC)
    assert queueing.waiting_since(ADMITTED) is None
    assert queueing.waiting_since(None) is None
