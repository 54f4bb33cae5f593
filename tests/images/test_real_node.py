"""The demo's FineTuneJob on a node of a real kubelet (v1.36.3, built from the Kubernetes module)
with Debian's containerd and runc, in the trainer image ``make images`` built.

``make demo REAL_NODE=1`` runs it (``realnode.py`` adds the node): the operator's own pod spec as
the kubelet runs it (uid 1000, read-only root, a projected service-account token, the job file
from the downward API, /dev/shm, the claims' hostPath volumes), the trainer's reports pushed over
the pod's network to the operator, and the termination message read by the kubelet. The same job
then runs on the node agent's GPU node in the same cluster, and the two statuses are compared; a
job with a missing base model ends with the contract's reason there too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devcluster import realnode
from finetune_devcluster.cluster import LocalCluster, load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TRAINER_UID = 1000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, trainer_image: str) -> Iterator[tuple[LocalCluster, str]]:
    """``make demo REAL_NODE=1 KEEP=1`` on a cluster of its own; its output; the cluster stopped after."""
    missing = realnode.requirements()
    assert not missing, f"a real node needs {missing} (make check-images installs the packages)"
    assert trainer_image == realnode.trainer_image()
    state = tmp_path_factory.mktemp("real-node") / "cluster"
    env = {k: v for k, v in os.environ.items() if k not in ("KEEP", "KUEUE", "KUBECONFIG", "REAL_NODE")}
    done = subprocess.run(
        [sys.executable, "-m", "finetune_devcluster.demo", "--state-dir", str(state), "--real-node", "--keep"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    try:
        assert done.returncode == 0, output[-5000:]
        yield load(state), output
    finally:
        if (state / "processes.json").is_file():
            load(state).stop()
        assert realnode.Network.for_state(state).bridge not in _links(), "the node's bridge outlived the cluster"
        assert not [m for m in Path("/proc/self/mounts").read_text().splitlines() if str(state) in m]


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def _get(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def _wait_ended(cluster: LocalCluster, name: str) -> dict[str, Any]:
    """The job's status once it ended; waits while its progress moves (not on a wall-clock guess)."""
    last, still = None, time.monotonic()
    while time.monotonic() - still < 240:
        status = _get(cluster, "-n", "demo", "get", "ftj", name).get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        seen = (status.get("phase"), (status.get("progress") or {}).get("step"), status.get("reason"))
        if seen != last:
            last, still = seen, time.monotonic()
        time.sleep(1)
    raise AssertionError(f"{name} stayed at {last} for 240 s")


def _comparable(status: dict[str, Any]) -> dict[str, Any]:
    """What must be the same on any node: no times, names or per-run numbers."""
    output = status.get("output") or {}
    return {
        "phase": status.get("phase"),
        "reason": status.get("reason"),
        "steps": ((status.get("progress") or {}).get("step"), (status.get("progress") or {}).get("totalSteps")),
        "checkpoints": [c["step"] for c in status.get("checkpoints") or []],
        "files": sorted(f["path"] for f in output.get("files") or []),
        "samples": len(output.get("samples") or []),
        "conditions": sorted((c["type"], c["status"]) for c in status.get("conditions") or []),
    }


def test_the_demo_job_succeeds_on_a_real_kubelet_as_the_operator_renders_it(demo: tuple[LocalCluster, str]) -> None:
    cluster, output = demo
    assert "demo   Succeeded" in output, output[-3000:]
    node = _get(cluster, "get", "node", realnode.NODE_NAME)
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.36.3"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")

    pods = _get(cluster, "-n", "demo", "get", "pods", "-l", "job-name=demo")["items"]
    ran = [p for p in pods if p["status"]["phase"] == "Succeeded"]
    assert ran, [p["status"] for p in pods]
    pod = ran[-1]
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    container = pod["status"]["containerStatuses"][0]
    assert container["image"].endswith(realnode.trainer_image().split("/", 1)[1])
    # The kubelet read the contract's summary from the termination message file.
    summary = json.loads(container["state"]["terminated"]["message"])
    assert container["state"]["terminated"]["exitCode"] == 0
    assert summary["phase"] == "Succeeded", summary
    # The pod's log comes through the apiserver from the real kubelet's API: the trainer's JSON.
    log = cluster.kubectl("-n", "demo", "logs", pod["metadata"]["name"])
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert lines and all(isinstance(line, dict) for line in lines)

    # Live progress reached the operator over the pod's network, authenticated by the projected
    # token (the termination message alone carries no Downloading or Caching stage).
    events = _get(cluster, "-n", "demo", "get", "events", "--field-selector", "involvedObject.name=demo")["items"]
    assert {"Downloading", "Caching"} <= {e["reason"] for e in events}

    # Written by the image's uid on the claim's folder, readable by the next pod and person.
    outputs = cluster.volumes / "demo" / "outputs" / "demo"
    written = [p for p in outputs.rglob("*") if p.is_file()]
    assert written and {p.stat().st_uid for p in written} == {TRAINER_UID}
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in written)
    assert (outputs / "demo.safetensors").stat().st_size > 0


def test_the_same_job_on_the_node_agent_ends_with_the_same_status(demo: tuple[LocalCluster, str]) -> None:
    cluster, _ = demo
    real = _get(cluster, "-n", "demo", "get", "ftj", "demo")["status"]
    manifest = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    manifest["metadata"]["name"] = "demo-agent"
    manifest["spec"]["output"]["uri"] = "pvc://outputs/demo-agent/"
    manifest["spec"]["resources"]["nodeSelector"] = {"finetune.dev/local-agent": "true"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    agent = _wait_ended(cluster, "demo-agent")
    pods = _get(cluster, "-n", "demo", "get", "pods", "-l", "job-name=demo-agent")["items"]
    assert pods and {p["spec"]["nodeName"] for p in pods} != {realnode.NODE_NAME}
    want = _comparable(real)
    got = _comparable(agent)
    got["files"] = [f.replace("demo-agent", "demo") for f in got["files"]]
    assert got == want


def test_a_missing_base_model_fails_on_the_real_node_with_the_contracts_reason(demo: tuple[LocalCluster, str]) -> None:
    cluster, _ = demo
    manifest = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    manifest["metadata"]["name"] = "no-model"
    manifest["spec"]["baseModel"]["uri"] = "pvc://models/not-there"
    manifest["spec"]["output"]["uri"] = "pvc://outputs/no-model/"
    manifest["spec"]["resources"]["nodeSelector"] = {realnode.NODE_LABEL: "true"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    status = _wait_ended(cluster, "no-model")
    assert (status["phase"], status["reason"]) == ("Failed", "BadInput"), status
    assert "spec.baseModel.uri" in status["message"]
    pods = _get(cluster, "-n", "demo", "get", "pods", "-l", "job-name=no-model")["items"]
    assert pods and {p["spec"]["nodeName"] for p in pods} == {realnode.NODE_NAME}
    terminated = pods[-1]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] != 0
    assert json.loads(terminated["message"])["reason"] == "BadInput"


def test_a_failed_try_is_retried_in_a_new_pod_on_the_real_node(demo: tuple[LocalCluster, str]) -> None:
    """The first try cannot write its output folder (root's, 0555, as a careless admin left it): the
    operator retries in a new pod, and once the folder is fixed the job Succeeds there."""
    cluster, _ = demo
    folder = cluster.volumes / "demo" / "outputs" / "retry"
    folder.mkdir()
    folder.chmod(0o555)
    manifest = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    manifest["metadata"]["name"] = "retry"
    manifest["spec"]["output"]["uri"] = "pvc://outputs/retry/"
    manifest["spec"]["resources"]["nodeSelector"] = {realnode.NODE_LABEL: "true"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def retrying() -> bool:
        status = _get(cluster, "-n", "demo", "get", "ftj", "retry").get("status") or {}
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        return "retrying" in (status.get("message") or "")

    deadline = time.monotonic() + 180
    while not retrying():
        assert time.monotonic() < deadline, "the first try never failed"
        time.sleep(0.5)
    folder.chmod(0o777)
    status = _wait_ended(cluster, "retry")
    assert status["phase"] == "Succeeded", status
    pods = _get(cluster, "-n", "demo", "get", "pods", "-l", "job-name=retry")["items"]
    assert len(pods) >= 2 and {p["spec"]["nodeName"] for p in pods} == {realnode.NODE_NAME}
    assert sorted(p["status"]["phase"] for p in pods)[-1] == "Succeeded"
    assert "Failed" in {p["status"]["phase"] for p in pods}
