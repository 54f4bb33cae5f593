"""A dataset of several concepts, each on a claim of its own (one with a dot in its name), through
the whole system: the operator mounts every claim and resolves each concept's pvc:// URI in the job
file, and the trainer reads them in its pod. Such a job used to fail as BadInput in a cluster (the
concepts' claims were neither mounted nor resolved)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.jobs import job_manifest
from tests.kube import Kube, OperatorProcess

pytestmark = pytest.mark.e2e


def test_concepts_on_claims_of_their_own_train_through_the_operator(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = {claim: kube.create_pvc(namespace, claim) for claim in ("models", "people", "pets.v2", "outputs")}
    shutil.copytree(tiny_assets / "tiny-sd", paths["models"] / "tiny-sd")
    pictures = sorted((tiny_assets / "subject").iterdir())
    for claim, picked in (("people", pictures[:2]), ("pets.v2", pictures[2:])):
        (paths[claim] / "photos").mkdir()
        for picture in picked:
            shutil.copy(picture, paths[claim] / "photos" / picture.name)
    manifest = job_manifest(
        "concepts",
        dataset={
            "concepts": [
                {"images": "pvc://people/photos/", "instancePrompt": "a photo of nqz man"},
                {"images": "pvc://pets.v2/photos/", "instancePrompt": "a photo of rqx dog"},
            ],
            "resolution": 64,
        },
        training={"maxSteps": 2},
        checkpoints={"everySteps": 0, "keepLast": 1},
        samples={"prompts": [], "everySteps": 0},
    )
    del manifest["spec"]["dataset"]["instanceImages"], manifest["spec"]["dataset"]["instancePrompt"]
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, "concepts", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    found = {c["name"]: c["images"] for c in status["dataset"]["concepts"]}
    assert sorted(found.values()) == [2, 2], status["dataset"]
    job = kube.batch.read_namespaced_job("concepts", namespace).to_dict()
    claims = {
        v["persistent_volume_claim"]["claim_name"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if v.get("persistent_volume_claim")
    }
    assert claims == {"models", "people", "pets.v2", "outputs"}
