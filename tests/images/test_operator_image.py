"""The operator image runs the chart's Deployment pod and reconciles a FineTuneJob on the dev cluster.

The pod spec is the chart's own (``helm template``), run by tests/images/pod.py: uid 65532, a
read-only root with /tmp as an empty folder, no capabilities. The dev cluster's kubeconfig is
mounted where a cluster would mount the service account's token, and the pod shares the host's
network to reach the control plane on loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from finetune_devcluster.images import PODMAN
from tests.bad_specs import good_manifest
from tests.cluster.test_helm import template
from tests.images.pod import clear, image_env, in_image, podman_run
from tests.kube import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "images"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except OSError:
        return 0, ""


def test_the_operator_image_runs_the_charts_pod_and_reconciles(
    operator_image: str, cluster: Any, kube: Any, namespace: str
) -> None:
    ports = {"metrics": free_port(), "progress": free_port(), "health": free_port()}
    docs = template(
        "--set", f"service.metricsPort={ports['metrics']}",
        "--set", f"service.progressPort={ports['progress']}",
        "--set", f"healthPort={ports['health']}",
        "--set", f"watchNamespaces[0]={namespace}",
    )  # fmt: skip
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "command" not in container, "the chart relies on the image's entrypoint"

    scratch = ARTIFACTS / "operator"
    clear(scratch)
    scratch.mkdir(parents=True)
    # A service account's token would be mounted here on a cluster; the dev cluster's kubeconfig
    # instead, readable by the pod's user as a mounted Secret's file would be.
    readable = scratch / "kubeconfig"
    shutil.copyfile(cluster.kubeconfig, readable)
    readable.chmod(0o444)
    kubeconfig = ("--volume", f"{readable}:/var/run/kubeconfig:ro", "--env", "KUBECONFIG=/var/run/kubeconfig")
    run = podman_run(
        {k: v for k, v in pod.items() if k not in {"affinity"}},
        pod_name="finetune-operator-test",
        annotations={},
        claims={},
        scratch=scratch,
        image=operator_image,
        namespace="finetune-system",
        network="host",
        extra=kubeconfig,
    )
    log = (scratch / "operator.log").open("w")
    process = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{ports['health']}"
        wait_for(lambda: get(f"{base}/readyz")[0] == 200 or None, timeout=120, what="the operator's /readyz")
        assert get(f"{base}/healthz")[0] == 200

        kube.create_ftj(namespace, good_manifest("in-image"))
        job = wait_for(
            lambda: next(iter(kube.batch.list_namespaced_job(namespace).items), None),
            timeout=120,
            what="the Job the operator in the image creates",
        )
        assert job.metadata.owner_references[0].kind == "FineTuneJob"
        assert job.spec.template.spec.containers[0].command[:3] == ["python", "-m", "finetune_trainer"]
        # Its status is the operator's: a phase and the Job it made.
        wait_for(lambda: kube.status(namespace, "in-image").get("phase"), timeout=60, what="a phase")

        code, metrics = get(f"http://127.0.0.1:{ports['metrics']}/metrics")
        assert code == 200 and "finetune_jobs" in metrics
    finally:
        subprocess.run([*PODMAN, "stop", "--time", "10", "finetune-operator-test"], capture_output=True, check=False)
        process.wait(timeout=60)
        log.close()
    text = (scratch / "operator.log").read_text()
    assert "Read-only file system" not in text, text[-3000:]


def test_the_operator_image_holds_no_trainer_packages(operator_image: str) -> None:
    result = in_image(operator_image, "python3", "-m", "pip", "list", "--format", "json")
    assert result.returncode == 0, result.stderr
    installed = {p["name"].lower() for p in json.loads(result.stdout)}
    assert {"kopf", "finetune-operator"} <= installed
    assert not installed & {"torch", "diffusers", "transformers"}, installed & {"torch", "diffusers"}
    assert image_env(operator_image)["PATH"].startswith("/opt/venv/bin")


@pytest.fixture(autouse=True)
def _no_leftover_container() -> None:
    subprocess.run([*PODMAN, "rm", "--force", "finetune-operator-test"], capture_output=True, check=False)
