"""What a platform team sees: Prometheus scraping the operator, and results that survive an
operator that was away while the job ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jobs import job_manifest, prepare_claims
from tests.kube import Kube, OperatorProcess, Prometheus, wait_for

pytestmark = pytest.mark.e2e


def test_prometheus_sees_the_jobs_step_and_jobs_by_phase(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path, prometheus: Prometheus
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    kube.create_ftj(namespace, job_manifest("scraped", training={"maxSteps": 300}))
    kube.wait_phase(namespace, "scraped", "Training", "Exporting", "Succeeded", timeout=120)
    selector = f'namespace="{namespace}",name="scraped"'
    running = wait_for(
        lambda: prometheus.value(f"finetune_job_step{{{selector}}}"), timeout=60, what="a step in Prometheus"
    )
    assert 0 < running <= 300
    status = kube.wait_phase(namespace, "scraped", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded"
    wait_for(
        lambda: prometheus.value(f"finetune_job_step{{{selector}}}") == 300.0,
        timeout=30,
        what="step 300 in Prometheus",
    )
    assert prometheus.value(f"finetune_job_total_steps{{{selector}}}") == 300.0
    assert prometheus.value(f"finetune_job_loss{{{selector}}}") is not None
    wait_for(
        lambda: (prometheus.value('finetune_jobs{phase="Succeeded"}') or 0) >= 1,
        timeout=30,
        what="a Succeeded job in finetune_jobs",
    )
    assert prometheus.value(f'finetune_job_info{{{selector},phase="Succeeded"}}') == 1.0
    assert (prometheus.value('sum(finetune_phase_transitions_total{phase="Training"})') or 0) >= 1
    assert (prometheus.value("sum(finetune_gpu_seconds_total)") or 0) > 0


def test_final_status_comes_from_the_termination_message_when_the_operator_was_away(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    kube.create_ftj(namespace, job_manifest("unwatched", training={"maxSteps": 600}))
    kube.wait_phase(namespace, "unwatched", "Training", timeout=120)
    operator.stop()
    try:
        wait_for(
            lambda: (kube.batch.read_namespaced_job("unwatched", namespace).status.succeeded or 0) == 1,
            timeout=240,
            what="the Job to finish while the operator is away",
        )
        stale = kube.status(namespace, "unwatched")
        assert stale["phase"] == "Training"
    finally:
        operator.start()
    status = kube.wait_phase(namespace, "unwatched", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 600
    files = {f["path"]: f for f in status["output"]["files"]}
    assert "unwatched.safetensors" in files
    local = paths["outputs"] / "unwatched" / "unwatched.safetensors"
    assert local.stat().st_size == files["unwatched.safetensors"]["sizeBytes"]
    assert status["output"]["uri"] == "pvc://outputs/unwatched"
