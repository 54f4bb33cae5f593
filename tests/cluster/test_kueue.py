"""Kueue in the local control plane is the real thing: its webhooks act on Jobs, its
pending-workloads API answers through the apiserver, and the documented two-team setup
(examples/kueue/two-teams.yaml) shares the GPU nodes with borrowing and reclaim.

The jobs here are plain batch/v1 Jobs that sleep (the node agent runs them as processes): what
is tested is Kueue's admission, not training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.kube import Kube, wait_for
from tests.queues import GROUP, VERSION, workloads

pytestmark = pytest.mark.cluster

TWO_TEAMS = ROOT / "examples" / "kueue" / "two-teams.yaml"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def sleeper(
    name: str, *, queue: str = "gpu", suspend: bool = True, seconds: int = 600, priority: str = ""
) -> dict[str, Any]:
    """A one-GPU Job in Kueue's LocalQueue ``queue`` that sleeps."""
    labels = {"kueue.x-k8s.io/queue-name": queue}
    if priority:
        labels["kueue.x-k8s.io/priority-class"] = priority
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": suspend,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 1,
                    "tolerations": [GPU_TOLERATION],
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "command": ["sleep", str(seconds)],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"nvidia.com/gpu": "1", "memory": "64Mi"},
                            },
                        }
                    ],
                }
            },
        },
    }


def condition(workload: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in workload.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def admitted(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    return [w for w in workloads(kube, namespace) if condition(w, "Admitted").get("status") == "True"]


def test_kueues_webhooks_act_on_jobs(kube: Kube, kueue: object, namespace: str) -> None:
    # Created unsuspended in a queue that does not exist: Kueue's mutating webhook suspends it.
    created = kube.batch.create_namespaced_job(namespace, sleeper("held", queue="no-such-queue", suspend=False))
    assert created.spec.suspend is True
    inadmissible = wait_for(
        lambda: [
            w for w in workloads(kube, namespace) if condition(w, "QuotaReserved").get("reason") == "Inadmissible"
        ],
        timeout=60,
        what="Kueue's Workload of the Job, inadmissible",
    )
    assert "no-such-queue" in condition(inadmissible[0], "QuotaReserved")["message"]
    # Kueue's validating webhook: a WorkloadPriorityClass, once on a Job, cannot be removed.
    kube.batch.create_namespaced_job(namespace, sleeper("prioritised", queue="no-such-queue", priority="low"))
    refused = kube.kubectl(
        "-n", namespace, "label", "job", "prioritised", "kueue.x-k8s.io/priority-class-", check=False
    )  # fmt: skip
    assert "denied the request" in refused and "WorkloadPriorityClass cannot be removed" in refused, refused
    hooks = json.loads(
        kube.kubectl("get", "mutatingwebhookconfiguration", "kueue-mutating-webhook-configuration", "-o", "json")
    )
    urls = {h["clientConfig"]["url"].split("/", 3)[2].split(":")[0] for h in hooks["webhooks"]}
    assert urls == {"127.0.0.1"}


def test_pending_workloads_api_answers_through_the_apiserver(kube: Kube, kueue: object, namespace: str) -> None:
    from tests.queues import Queues

    queues = Queues(kube)
    try:
        queues.gpu_queue(namespace, gpus=1)
        for name in ("one", "two", "three"):
            kube.batch.create_namespaced_job(namespace, sleeper(name))
        path = f"/apis/visibility.kueue.x-k8s.io/v1beta2/namespaces/{namespace}/localqueues/gpu/pendingworkloads"

        def pending() -> list[dict[str, Any]] | None:
            items = json.loads(kube.kubectl("get", "--raw", path))["items"]
            return items if len(items) == 2 else None

        items = wait_for(pending, timeout=60, what="two pending workloads")
        assert [i["positionInLocalQueue"] for i in items] == [0, 1]
        (running,) = admitted(kube, namespace)
        waiting = {i["metadata"]["ownerReferences"][0]["name"] for i in items}
        assert waiting | {running["metadata"]["ownerReferences"][0]["name"]} == {"one", "two", "three"}
    finally:
        kube.batch.delete_collection_namespaced_job(namespace, propagation_policy="Background")
        queues.delete_all()


@pytest.fixture
def two_teams(kube: Kube, kueue: object) -> Iterator[tuple[str, str]]:
    for team in ("team-a", "team-b"):
        kube.kubectl("create", "namespace", team, check=False)
        kube.batch.delete_collection_namespaced_job(team, propagation_policy="Background")
    kube.kubectl("apply", "--server-side", "-f", str(TWO_TEAMS))
    kube.kubectl("wait", "--for=condition=Active", "clusterqueue/team-a", "clusterqueue/team-b", "--timeout=60s")
    try:
        yield "team-a", "team-b"
    finally:
        for team in ("team-a", "team-b"):
            kube.batch.delete_collection_namespaced_job(team, propagation_policy="Background")
        kube.kubectl("delete", "-f", str(TWO_TEAMS), "--wait=false", check=False)


def gpu_usage(kube: Kube, cluster_queue: str) -> dict[str, Any]:
    queue = kube.custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue)
    for flavor in queue.get("status", {}).get("flavorsUsage", []):
        for resource in flavor["resources"]:
            if resource["name"] == "nvidia.com/gpu":
                return dict(resource)
    return {}


def test_the_two_teams_example_borrows_idle_gpus_and_takes_them_back(kube: Kube, two_teams: tuple[str, str]) -> None:
    team_a, team_b = two_teams
    # Team B's share is one GPU; team A's two are idle, so B may borrow them (borrowingLimit 2).
    for number in range(3):
        kube.batch.create_namespaced_job(team_b, sleeper(f"b{number}"))
    wait_for(lambda: len(admitted(kube, team_b)) == 3, timeout=60, what="all three of team B's jobs admitted")
    usage = wait_for(
        lambda: (u := gpu_usage(kube, "team-b")).get("total") == "3" and u,
        timeout=30,
        what="team B's ClusterQueue using three GPUs",
    )
    assert usage["borrowed"] == "2"

    # Team A wants its share back: Kueue reclaims it from team B's borrowed GPUs.
    kube.batch.create_namespaced_job(team_a, sleeper("a0"))
    wait_for(lambda: len(admitted(kube, team_a)) == 1, timeout=60, what="team A's job admitted by reclaim")
    evicted = wait_for(
        lambda: [w for w in workloads(kube, team_b) if condition(w, "Evicted").get("reason") == "Preempted"],
        timeout=60,
        what="one of team B's jobs preempted",
    )
    assert len(evicted) == 1
    assert condition(evicted[0], "Preempted").get("reason") == "InCohortReclamation"
    assert len(admitted(kube, team_b)) == 2
    owner = evicted[0]["metadata"]["ownerReferences"][0]["name"]
    wait_for(lambda: kube.batch.read_namespaced_job(owner, team_b).spec.suspend, timeout=30, what="its Job suspended")
