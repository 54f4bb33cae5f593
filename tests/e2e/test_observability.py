"""What a platform team sees: Prometheus scraping the operator, and results that survive an
operator that was away while the job ran."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ARTIFACTS
from tests.jobs import job_manifest, prepare_claims
from tests.kube import Kube, OperatorProcess, free_port, wait_for

pytestmark = pytest.mark.e2e


class Prometheus:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.process = process
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="session")
def prometheus(operator: OperatorProcess) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus server is not installed: `make test` installs Debian's prometheus package")
    root = ARTIFACTS / "prometheus"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: finetune-operator\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{operator.metrics_port}']\n"
    )
    port = free_port()
    log = root / "prometheus.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(port, process, log)
    try:
        wait_for(
            lambda: server.value('up{job="finetune-operator"}') == 1.0,
            timeout=60,
            what="Prometheus to scrape the operator",
        )
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


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
