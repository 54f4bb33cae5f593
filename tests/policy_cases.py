"""A platform team's job policy (finetune_api.job_policy) and the specs it must refuse or admit:
one table for the operator's check and the admission policy, so both are held to the same cases."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.bad_specs import _set, good_manifest

# As the chart's ConfigMap holds it (and the operator's --allowed-* flags).
POLICY = {
    "images": "registry.example/finetune/, ghcr.io/finetune-operator/trainer",
    "secrets": "hub-",
    "claims": "team-",
    "writableClaims": "team-out",
}


def allowed_manifest(name: str = "allowed") -> dict[str, Any]:
    """Every name the policy is about, each allowed."""
    manifest = good_manifest(name)
    spec = manifest["spec"]
    spec["image"] = "registry.example/finetune/trainer:1.4"
    spec["baseModel"] = {"uri": "pvc://team-models/sd15", "type": "v1x", "credentialsSecret": "hub-token"}
    spec["dataset"]["instanceImages"] = "pvc://team-data/nick/"
    spec["output"] = {"uri": "pvc://team-outputs/nick/"}
    return manifest


@dataclass(frozen=True)
class Refused:
    id: str
    change: Callable[[dict[str, Any]], None]
    field: str  # what the operator's sentence starts with
    words: str  # what both enforcers say

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
]  # fmt: skip
