"""A platform team's job policy (finetune_api.job_policy) and the specs it must refuse or admit:
one table for the operator's check and the admission policy, so both are held to the same cases."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_api.job_policy import JobPolicy
from finetune_operator.settings import OperatorSettings
from tests.bad_specs import _set, good_manifest

# The placement profiles, as the chart's values define them (the operator gets them whole).
PROFILES = {
    "a100": {
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}],
        "priorityClassName": "batch-high",
    },
    "cpu": {},
}
# As the chart's ConfigMap holds it (and the operator's --allowed-* flags).
POLICY = {
    "images": "registry.example/finetune/, ghcr.io/finetune-operator/trainer",
    "secrets": "hub-",
    "claims": "team-",
    "writableClaims": "team-out",
    "priorityClasses": "batch-",
    "gpuResources": "nvidia.com/",
    "maxGPUs": "4",
    "maxMemory": "64Gi",
    "placementProfiles": ",".join(sorted(PROFILES)),
    "freePlacement": "true",
}
PROFILES_ONLY = {"freePlacement": "false"}


def operator_settings(overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The operator's settings for POLICY with ``overrides`` (what the chart's flags set)."""
    data = {**POLICY, **(overrides or {})}
    return {
        "allowed_images": data["images"],
        "allowed_secrets": data["secrets"],
        "allowed_claims": data["claims"],
        "allowed_writable_claims": data["writableClaims"],
        "allowed_priority_classes": data["priorityClasses"],
        "allowed_gpu_resources": data["gpuResources"],
        "max_gpus_per_job": int(data["maxGPUs"]),
        "max_memory_per_job": data["maxMemory"],
        "placement_profiles": json.dumps(PROFILES),
        "placement_profiles_only": data["freePlacement"] == "false",
    }


def job_policy(overrides: dict[str, str] | None = None) -> JobPolicy:
    """The operator's JobPolicy for POLICY with ``overrides``, as its flags give it."""
    return OperatorSettings(**operator_settings(overrides)).policy()


def allowed_manifest(name: str = "allowed") -> dict[str, Any]:
    """Every name the policy is about, each allowed."""
    manifest = good_manifest(name)
    spec = manifest["spec"]
    spec["image"] = "registry.example/finetune/trainer:1.4"
    spec["baseModel"] = {"uri": "pvc://team-models/sd15", "type": "v1x", "credentialsSecret": "hub-token"}
    spec["dataset"]["instanceImages"] = "pvc://team-data/nick/"
    spec["output"] = {"uri": "pvc://team-outputs/nick/"}
    spec["resources"] = {"placementProfile": "a100"}
    return manifest


def placed_freely(name: str = "free") -> dict[str, Any]:
    """Allowed where free placement is: the job's own priority class, toleration and node label."""
    manifest = allowed_manifest(name)
    manifest["spec"]["resources"].update(
        priorityClassName="batch-low",
        gpuResource="nvidia.com/mig-1g.10gb",
        tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        nodeSelector={"topology.kubernetes.io/zone": "eu-west-1a"},
    )
    return manifest


@dataclass(frozen=True)
class Refused:
    id: str
    change: Callable[[dict[str, Any]], None]
    field: str  # what the operator's sentence starts with
    words: str  # what both enforcers say
    policy: dict[str, str] = field(default_factory=dict)  # POLICY's values changed for this case

    def manifest(self, name: str) -> dict[str, Any]:
        manifest = copy.deepcopy(allowed_manifest(name))
        self.change(manifest)
        return manifest


REFUSED = [
    Refused("image", _set("image", "docker.io/someone/miner:latest"), "spec.image",
            "image docker.io/someone/miner:latest is not allowed on this cluster: it must start with one of "
            "registry.example/finetune/,ghcr.io/finetune-operator/trainer (the chart's jobPolicy.images"),
    Refused("secret", _set("baseModel.credentialsSecret", "database-password"), "spec.baseModel.credentialsSecret",
            "Secret database-password is not allowed on this cluster: it must start with one of hub- "
            "(the chart's jobPolicy.secrets"),
    Refused("claim", _set("dataset.instanceImages", "pvc://payroll/scans/"), "spec.dataset.instanceImages",
            "claim payroll is not allowed on this cluster: it must start with one of team- "
            "(the chart's jobPolicy.claims"),
    Refused("writable-claim", _set("output.uri", "pvc://team-models/sd15-out/"), "spec.output.uri",
            "writable claim team-models is not allowed on this cluster: it must start with one of team-out "
            "(the chart's jobPolicy.writableClaims"),
    Refused("class-images", _set("dataset.classImages", "pvc://team-data/class/"), "spec.dataset.classImages",
            "writable claim team-data is not allowed on this cluster"),
    Refused("concept", lambda m: m["spec"].update(dataset={"concepts": [
                {"images": "pvc://hr/photos/", "instancePrompt": "a photo of sks"}]}),
            "spec.dataset.concepts[0].images", "claim hr is not allowed on this cluster"),
    Refused("priority-class", _set("resources.priorityClassName", "system-cluster-critical"),
            "spec.resources.priorityClassName",
            "priority class system-cluster-critical is not allowed on this cluster: it must start with one of "
            "batch- (the chart's jobPolicy.priorityClasses"),
    Refused("gpu-resource", _set("resources.gpuResource", "example.com/fpga"), "spec.resources.gpuResource",
            "GPU resource example.com/fpga is not allowed on this cluster: it must start with one of nvidia.com/ "
            "(the chart's jobPolicy.gpuResources"),
    Refused("gpus", _set("resources.gpus", 8), "spec.resources.gpus",
            "spec.resources.gpus: 8 is more than a job may ask for on this cluster (at most 4: the operator's "
            "--max-gpus-per-job, the chart's jobLimits.maxGPUs); ask for fewer"),
    Refused("memory", _set("resources.memory", "0.125Ti"), "spec.resources.memory",
            "spec.resources.memory: 0.125Ti is more than a job may ask for on this cluster (at most 64Gi: the "
            "operator's --max-memory-per-job, the chart's jobLimits.maxMemory); ask for less"),
    Refused("unknown-profile", _set("resources.placementProfile", "h100"), "spec.resources.placementProfile",
            "placement profile h100 is not defined on this cluster: it must be one of a100,cpu "
            "(the chart's jobPolicy.placementProfiles"),
    *(
        Refused(f"profiles-only-{wire}", _set(f"resources.{wire}", value), f"spec.resources.{wire}",
                "free placement is not allowed on this cluster: pods are placed by a profile, "
                "spec.resources.placementProfile, one of a100,cpu (the chart's jobPolicy.freePlacement",
                PROFILES_ONLY)
        for wire, value in (
            ("tolerations", [{"key": "dedicated", "operator": "Equal", "value": "team-b", "effect": "NoSchedule"}]),
            ("nodeSelector", {"kubernetes.io/hostname": "team-b-gpu-7"}),
            ("affinity", {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["team-b"]}]}]}}}),
            ("priorityClassName", "batch-high"),
        )
    ),
]  # fmt: skip
