"""Kueue objects for tests: a ResourceFlavor, ClusterQueues with GPU quota, LocalQueues and
WorkloadPriorityClasses, in Kueue's v1beta2 API (its storage version)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.kube import Kube, wait_for

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
FLAVOR = "finetune-test-flavor"


def _create(kube: Kube, plural: str, body: dict[str, Any], namespace: str | None = None) -> None:
    try:
        if namespace:
            kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        else:
            kube.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
    except ApiException as exc:
        if exc.status != 409:
            raise


def priority_class(kube: Kube, name: str, value: int) -> str:
    _create(
        kube,
        "workloadpriorityclasses",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": name},
            "value": value,
        },
    )
    return name


@dataclass
class Queues:
    """ClusterQueues made by one test (cluster-scoped, so named after its namespace), deleted after."""

    kube: Kube
    made: list[str] = field(default_factory=list)

    def gpu_queue(self, namespace: str, *, gpus: int, local_queue: str = "gpu", preempt: bool = False) -> str:
        """A ClusterQueue with ``gpus`` nvidia.com/gpu of quota (CPU and memory ample) for
        ``namespace`` alone, and the LocalQueue ``local_queue`` there; returns the ClusterQueue."""
        _create(
            self.kube,
            "resourceflavors",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        )
        name = f"{namespace}-gpus"[:63]
        spec: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [
                        {
                            "name": FLAVOR,
                            "resources": [
                                {"name": "cpu", "nominalQuota": "64"},
                                {"name": "memory", "nominalQuota": "256Gi"},
                                {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                            ],
                        }
                    ],
                }
            ],
        }
        if preempt:
            spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
        _create(
            self.kube,
            "clusterqueues",
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec},
        )
        self.made.append(name)
        _create(
            self.kube,
            "localqueues",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LocalQueue",
                "metadata": {"name": local_queue, "namespace": namespace},
                "spec": {"clusterQueue": name},
            },
            namespace,
        )
        wait_for(
            lambda: active(
                self.kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", local_queue)
            ),
            timeout=60,
            what=f"LocalQueue {namespace}/{local_queue} active",
        )
        return name

    def delete_all(self) -> None:
        for name in self.made:
            try:
                self.kube.custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def active(obj: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Active" and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def workloads(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    return list(kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"])
