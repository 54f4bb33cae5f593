"""Placement: GPUs, CPU and memory, and the nodes the pod may use."""

from __future__ import annotations

from typing import Any

from finetune_operator.render.placement import place_pod
from finetune_operator.render.trainer import pod_spec, trainer_container
from tests.unit.render.specs import parsed, with_fields

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_the_pod_asks_for_its_gpus_cpu_and_memory(job: dict[str, Any]) -> None:
    place_pod(job, parsed(with_fields("resources", gpus=2, cpu="6", memory="48Gi")).spec.resources)
    assert trainer_container(job)["resources"] == {
        "requests": {"cpu": "6", "memory": "48Gi"},
        "limits": {"nvidia.com/gpu": "2", "memory": "48Gi"},
    }
    pod = pod_spec(job)
    assert pod["tolerations"] == []
    assert not {"nodeSelector", "affinity", "priorityClassName"} & pod.keys()


def test_the_clusters_gpu_resource_applies_unless_the_spec_names_its_own(job: dict[str, Any]) -> None:
    place_pod(job, parsed().spec.resources, gpu_resource="amd.com/gpu")
    assert trainer_container(job)["resources"]["limits"]["amd.com/gpu"] == "1"
    place_pod(
        job, parsed(with_fields("resources", gpuResource="intel.com/gpu")).spec.resources, gpu_resource="amd.com/gpu"
    )
    assert set(trainer_container(job)["resources"]["limits"]) == {"intel.com/gpu", "memory"}


def test_the_clusters_tolerations_come_first_and_each_only_once(job: dict[str, Any]) -> None:
    own = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    resources = parsed(with_fields("resources", tolerations=[own, GPU_TOLERATION])).spec.resources
    place_pod(job, resources, default_tolerations=[GPU_TOLERATION])
    assert pod_spec(job)["tolerations"] == [GPU_TOLERATION, own]
    # The pod holds copies: a later change to the operator's settings does not reach a rendered Job.
    pod_spec(job)["tolerations"][0]["effect"] = "NoExecute"
    assert GPU_TOLERATION["effect"] == "NoSchedule"


def test_node_selector_affinity_and_priority_class_reach_the_pod(job: dict[str, Any]) -> None:
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    spec = parsed(
        with_fields("resources", nodeSelector={"pool": "a100"}, affinity=affinity, priorityClassName="training")
    )
    place_pod(job, spec.spec.resources)
    pod = pod_spec(job)
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "training"
    pod["affinity"]["nodeAffinity"]["x"] = 1
    assert "x" not in spec.spec.resources.affinity["nodeAffinity"]
