"""What the operator keeps of its objects and how it finds a FineTuneJob's own: pure, no cluster."""

from __future__ import annotations

from typing import Any

from finetune_api.contract import ANNOTATION_FULL_NAME
from finetune_operator.cache import (
    Cache,
    controller_uid,
    owner_key,
    owning_job,
    resource_version,
    slim_finetunejob,
    slim_job,
    slim_pod,
    slim_workload,
)

KEY = ("team", "nick")


def owned_by(kind: str, name: str, uid: str, *, controller: bool = True) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "name": name, "uid": uid, "controller": controller}


def ftj(uid: str = "ftj-1", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "nick", "namespace": "team", "uid": uid, "generation": 1, "resourceVersion": "10"},
        "spec": {"method": "LoRA"},
        "status": status,
    }


def job(uid: str, owner_uid: str, name: str = "nick") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": uid,
            "ownerReferences": [owned_by("FineTuneJob", "nick", owner_uid)],
        }
    }


def pod(uid: str, job_uid: str | None) -> dict[str, Any]:
    refs = [owned_by("Job", "nick", job_uid)] if job_uid else []
    return {"metadata": {"name": f"nick-{uid}", "namespace": "team", "uid": uid, "ownerReferences": refs}}


def cache_of(
    ftjs: list[dict[str, Any]],
    jobs: list[dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    workloads: dict[Any, list[dict[str, Any]]] | None = None,
) -> Cache:
    cache = Cache()
    cache.bind(
        ftjs={KEY: ftjs} if ftjs else {},
        jobs={KEY: jobs} if jobs else {},
        pods={KEY: pods} if pods else {},
        workloads=workloads or {},
        job_owners={("team", "nick"): ["nick"]} if jobs else {},
    )
    return cache


def test_an_unbound_cache_knows_nothing() -> None:
    cache = Cache()
    assert cache.keys() == []
    assert cache.ftj(KEY) is None
    assert cache.current_pods(KEY) == []
    assert cache.owner_of_job("team", "nick") is None
    assert not cache.has_jobs(KEY)


def test_the_job_of_a_finetunejob_is_the_one_its_owner_reference_names() -> None:
    earlier = job("job-0", owner_uid="ftj-0")  # a deleted FineTuneJob's of the same name, not yet collected
    ours = job("job-1", owner_uid="ftj-1")
    cache = cache_of([ftj()], jobs=[earlier, ours])
    assert cache.has_jobs(KEY)
    assert cache.our_job(KEY, "ftj-1") is ours
    assert cache.our_job(KEY, "ftj-2") is None


def test_a_job_that_only_carries_the_name_is_not_taken_for_ours() -> None:
    cache = cache_of([ftj()], jobs=[job("job-x", owner_uid="someone-else")])
    assert cache.has_jobs(KEY)  # filed under the name: a creation would conflict
    assert cache.our_job(KEY, "ftj-1") is None
    assert cache.current_pods(KEY) == []


def test_the_current_pods_are_those_of_the_current_job_only() -> None:
    ours = job("job-1", owner_uid="ftj-1")
    current = pod("p1", "job-1")
    stale = pod("p0", "job-0")  # an earlier Job's pod, still terminating
    stray = pod("p2", None)  # a pod that only carries our annotation
    cache = cache_of([ftj()], jobs=[ours], pods=[current, stale, stray])
    assert cache.pods_of_job(KEY, ours) == [current]
    assert cache.current_pods(KEY) == [current]
    assert cache.pods_filed(KEY) == [current, stale, stray]
    assert cache.pods_of_job(KEY, None) == []


def test_a_workload_is_found_by_its_job_and_a_job_by_its_name() -> None:
    ours = job("job-1", owner_uid="ftj-1")
    workload = {
        "metadata": {
            "name": "job-nick-abcde",
            "creationTimestamp": "2026-11-25T12:00:00Z",
            "ownerReferences": [{"kind": "Job", "name": "nick", "uid": "job-1"}],
        }
    }
    earlier = {
        "metadata": {
            "name": "job-nick-zzzzz",
            "creationTimestamp": "2026-11-25T11:00:00Z",
            "ownerReferences": [{"kind": "Job", "name": "nick", "uid": "job-0"}],
        }
    }
    cache = cache_of([ftj()], jobs=[ours], workloads={("team", "nick"): [earlier, workload]})
    assert cache.workload_of("team", ours) == workload
    assert cache.workload_of("team", None) is None
    assert cache.owner_of_job("team", "nick") == KEY
    assert cache.owner_of_job("team", "other") is None
    assert cache.keys() == [KEY]
    assert cache.ftj(KEY) == ftj()


def test_objects_are_filed_under_the_finetunejob_they_name() -> None:
    annotated = {"metadata": {"annotations": {ANNOTATION_FULL_NAME: "nick"}}}
    assert owner_key("team", annotated) == KEY
    assert owner_key(None, annotated) is None
    assert owner_key("team", {"metadata": {}}) is None
    workload = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "x"},
                {"apiVersion": "batch/v1", "kind": "Job", "name": "nick"},
            ]
        }
    }
    assert owning_job(workload) == "nick"
    assert owning_job({"metadata": {}}) is None


def test_the_controller_is_the_owner_that_counts() -> None:
    body = {"metadata": {"ownerReferences": [owned_by("X", "a", "u1", controller=False), owned_by("Job", "b", "u2")]}}
    assert controller_uid(body) == "u2"
    assert controller_uid({"metadata": {}}) is None


def test_resource_versions_compare_as_numbers() -> None:
    assert resource_version({"metadata": {"resourceVersion": "100"}}) > resource_version(
        {"metadata": {"resourceVersion": "99"}}
    )
    assert resource_version({"metadata": {}}) == 0
    assert resource_version({"metadata": {"resourceVersion": "not-a-number"}}) == 0


def full_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "nick-abcde",
            "namespace": "team",
            "uid": "p1",
            "resourceVersion": "7",
            "labels": {"a": "b"},
            "annotations": {ANNOTATION_FULL_NAME: "nick", "big": "x" * 1000},
            "managedFields": [{"manager": "kubelet"}],
            "ownerReferences": [owned_by("Job", "nick", "job-1"), owned_by("Thing", "t", "t1", controller=False)],
        },
        "spec": {"nodeName": "gpu-1", "containers": [{"name": "trainer", "env": [{"name": "A", "value": "1"}]}]},
        "status": {
            "phase": "Running",
            "startTime": "2026-11-25T12:00:00Z",
            "containerStatuses": [{"name": "trainer", "ready": True}],
            "podIP": "10.0.0.1",
        },
    }


def test_a_pod_is_kept_with_only_what_the_status_reads() -> None:
    slim = slim_pod(full_pod())
    assert slim["metadata"]["ownerReferences"] == [{"kind": "Job", "name": "nick", "uid": "job-1", "controller": True}]
    assert "annotations" not in slim["metadata"] and "managedFields" not in slim["metadata"]
    assert slim["spec"] == {"nodeName": "gpu-1"}
    assert set(slim["status"]) == {"phase", "startTime", "containerStatuses"}
    assert controller_uid(slim) == "job-1"


def test_a_job_and_a_finetunejob_keep_what_the_reconciler_reads() -> None:
    body = {
        "metadata": {
            "name": "nick",
            "namespace": "team",
            "uid": "job-1",
            "resourceVersion": "5",
            "labels": {"x": "y"},
            "ownerReferences": [owned_by("FineTuneJob", "nick", "ftj-1")],
        },
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}, "ttlSecondsAfterFinished": 60},
        "status": {"active": 1},
    }
    slim = slim_job(body)
    assert slim["spec"] == {"suspend": True, "ttlSecondsAfterFinished": 60}
    assert slim["status"] == {"active": 1}
    assert "labels" not in slim["metadata"]
    assert controller_uid(slim) == "ftj-1"
    full = {**ftj(phase="Queued"), "metadata": {**ftj()["metadata"], "managedFields": [{}], "annotations": {"a": "b"}}}
    kept = slim_finetunejob(full)
    assert kept["metadata"] == ftj()["metadata"]
    assert kept["status"] == {"phase": "Queued"} and kept["spec"] == {"method": "LoRA"}


def test_a_workload_keeps_its_owner_activity_conditions_and_cluster_queue() -> None:
    body = {
        "metadata": {
            "name": "job-nick-abcde",
            "namespace": "team",
            "uid": "w1",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "nick", "uid": "job-1"}],
        },
        "spec": {"active": False, "queueName": "gpu", "podSets": [{"count": 1}]},
        "status": {
            "conditions": [{"type": "QuotaReserved", "status": "True"}],
            "admission": {"clusterQueue": "cq", "podSetAssignments": [{}]},
        },
    }
    slim = slim_workload(body)
    assert slim["metadata"]["ownerReferences"] == [{"kind": "Job", "name": "nick", "uid": "job-1"}]
    assert slim["spec"] == {"active": False, "queueName": "gpu"}
    assert slim["status"] == {
        "conditions": [{"type": "QuotaReserved", "status": "True"}],
        "admission": {"clusterQueue": "cq"},
    }
