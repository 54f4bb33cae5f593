"""status.estimate on the dev cluster: after two finished jobs of a kind, a new job of that kind
gets an estimate before it runs (kubectl get -o wide shows it), from the speeds the operator keeps
in its ConfigMap; a job of another kind gets none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.jobs import job_manifest, prepare_claims
from tests.kube import Kube, OperatorProcess

pytestmark = pytest.mark.e2e

# A kind no other test runs (accumulation 3), so that only these jobs are its basis.
TRAINING = {"maxSteps": 12, "gradientAccumulationSteps": 3}


def test_two_finished_jobs_of_a_kind_give_the_next_one_an_estimate(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    quiet = {"prompts": []}
    for name in ("basis-1", "basis-2"):
        kube.create_ftj(namespace, job_manifest(name, training=TRAINING, samples=quiet, checkpoints={"everySteps": 0}))
    for name in ("basis-1", "basis-2"):
        status = kube.wait_phase(namespace, name, "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status
        assert "estimate" not in status  # none before them: no basis yet

    waiting = job_manifest("estimated", training={**TRAINING, "maxSteps": 24}, samples=quiet)
    waiting["spec"]["runPolicy"] = {"suspend": True}
    kube.create_ftj(namespace, waiting)
    status = kube.wait_status(namespace, "estimated", lambda s: s.get("estimate"), timeout=60, what="an estimate")
    estimate = status["estimate"]
    assert estimate["basedOn"] == 2, estimate
    assert estimate["durationSeconds"] > 0 and estimate["gpuProduct"] == "Local-Simulated-GPU"
    assert estimate["cost"] == pytest.approx(estimate["durationSeconds"] / 100, abs=0.01)  # 36 an hour
    assert "usage" not in status
    wide = kube.kubectl("get", "ftj", "estimated", "-n", namespace, "-o", "wide")
    header, row = wide.splitlines()[:2]
    assert "ESTIMATE" in header and estimate["durationText"] in row.split()

    other = job_manifest("other-kind", training={"maxSteps": 24, "gradientAccumulationSteps": 5}, samples=quiet)
    other["spec"]["runPolicy"] = {"suspend": True}
    kube.create_ftj(namespace, other)
    kube.wait_phase(namespace, "other-kind", "Suspended", timeout=60)
    assert "estimate" not in kube.status(namespace, "other-kind")

    kept = json.loads(kube.kubectl("get", "configmap", "finetune-operator-speeds", "-n", "default", "-o", "json"))
    book = json.loads(kept["data"]["speeds.json"])
    assert len(book["v1x.DreamBooth.64px.batch1x3.1gpu"]) >= 2
