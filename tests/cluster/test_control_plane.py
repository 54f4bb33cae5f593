"""The local control plane is the real thing: the apiserver validates our CRD, the scheduler
places GPU pods, the node agent runs them, the garbage collector cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_api.rules import Rule
from tests.bad_specs import BAD_SPECS, CLUSTER_ONLY_BAD_SPECS, BadSpec, bad_manifest, good_manifest, rule_cases
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_job(name: str, *, gpus: int, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "tolerations": [GPU_TOLERATION],
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "command": command,
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                }
            },
        },
    }


def test_gpu_nodes_are_ready(kube: Kube) -> None:
    nodes = kube.core.list_node(label_selector="finetune.dev/local-agent=true").items
    gpus = sorted(int(n.status.allocatable["nvidia.com/gpu"]) for n in nodes)
    assert gpus == [1, 2]
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
        assert node.metadata.labels["nvidia.com/gpu.present"] == "true"
        assert any(t.key == "nvidia.com/gpu" for t in node.spec.taints)
    printed = kube.kubectl("get", "nodes")
    assert "gpu-node-1" in printed and "Ready" in printed


def test_crd_is_served_and_explained(kube: Kube) -> None:
    explained = kube.kubectl("explain", "ftj.spec.training")
    assert "stepsPerImage" in explained
    assert "How many times each instance image is seen" in explained
    # The default learning rate depends on the method, and explain says which.
    rate = kube.kubectl("explain", "ftj.spec.training.learningRate")
    assert "2e-6 for method DreamBooth" in rate and "1e-4 for method LoRA" in rate
    assert "optimizer" in explained
    assert "FineTuneJob" in kube.kubectl("explain", "ftj.spec")


def test_good_spec_is_accepted_by_the_apiserver(kube: Kube, namespace: str) -> None:
    manifest = good_manifest("accepted")
    created = kube.custom.create_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunejobs", manifest, dry_run="All"
    )
    # The apiserver applies the schema's defaults.
    assert created["spec"]["training"]["optimizer"] == "AdamW8bit"
    assert created["spec"]["runPolicy"]["backoffLimit"] == 3


@pytest.mark.parametrize("case", BAD_SPECS, ids=lambda c: c.id)
def test_bad_spec_is_rejected_by_the_apiserver(kube: Kube, namespace: str, case: BadSpec) -> None:
    import yaml

    manifest = bad_manifest(case, name="bad")
    manifest["metadata"]["namespace"] = namespace
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(manifest))
    assert "created (server dry run)" not in out, f"{case.id} was accepted"
    assert case.field in out, f"{case.id}: the apiserver's message does not name {case.field}:\n{out}"


@pytest.mark.parametrize(("rule", "case"), rule_cases(), ids=[f"{case.id}" for _, case in rule_cases()])
def test_the_apiserver_refuses_a_rule_breaking_spec_with_the_models_words(
    kube: Kube, namespace: str, rule: Rule, case: BadSpec
) -> None:
    """The rule's CEL (the CRD) and its predicate (the models) agree on the same bad spec, word
    for word: the models' side is in tests/unit/test_rules.py."""
    import yaml

    manifest = bad_manifest(case, name="bad")
    manifest["metadata"]["namespace"] = namespace
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(manifest))
    assert "created (server dry run)" not in out, f"{case.id} was accepted"
    assert rule.message in " ".join(out.split()), f"{case.id}: the apiserver said\n{out}"


@pytest.mark.parametrize("case", CLUSTER_ONLY_BAD_SPECS, ids=lambda c: c.id)
def test_a_path_the_pod_would_keep_to_itself_is_refused_by_the_cluster(
    kube: Kube, namespace: str, case: BadSpec
) -> None:
    """A plain path or file:// would be read and written inside the pod and vanish with it (they
    stay valid for `finetune-trainer run` on a workstation: see the model tests)."""
    import yaml

    manifest = bad_manifest(case, name="bad")
    manifest["metadata"]["namespace"] = namespace
    out = kube.kubectl("apply", "--dry-run=server", "-f", "-", check=False, input=yaml.safe_dump(manifest))
    assert "created (server dry run)" not in out, f"{case.id} was accepted"
    assert f"{case.field}: Invalid value: " in out, out
    assert "a plain path or file:// URI would be inside the training pod" in out, out
    assert "pvc://CLAIM/path" in out


def test_spec_model_is_immutable_but_suspend_is_not(kube: Kube, namespace: str) -> None:
    kube.create_ftj(namespace, good_manifest("frozen"))
    changes = [
        ({"baseModel": {"uri": "pvc://models/other"}}, "spec.baseModel"),
        ({"method": "LoRA"}, "spec.method"),
        ({"dataset": {"instancePrompt": "a photo of zwx dog"}}, "spec.dataset"),
        ({"runPolicy": {"priorityClass": "high"}}, "spec.runPolicy.priorityClass"),
    ]
    for change, field in changes:
        out = kube.kubectl(
            "-n", namespace, "patch", "ftj", "frozen", "--type=merge", "-p", json.dumps({"spec": change}), check=False
        )  # fmt: skip
        assert f"{field} is immutable once the job exists" in out, (change, out)
    # Before the Job exists, what it is made from may still be mended.
    out = kube.kubectl(
        "-n", namespace, "patch", "ftj", "frozen", "--type=merge", "-p", '{"spec":{"training":{"learningRate":1e-5}}}'
    )  # fmt: skip
    assert "patched" in out
    out = kube.kubectl(
        "-n", namespace, "patch", "ftj", "frozen", "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}'
    )  # fmt: skip
    assert "patched" in out


def test_gpu_job_runs_to_completion_with_exit_code_and_message(kube: Kube, namespace: str) -> None:
    script = 'echo "trained well" > /dev/termination-log; test "$FINETUNE_TERMINATION_LOG" != ""; exit 7'
    kube.batch.create_namespaced_job(namespace, gpu_job("gpu", gpus=1, command=["sh", "-c", script]))

    def finished() -> Any:
        pods = kube.pods(namespace, "job-name=gpu")
        if pods and pods[0].status.phase == "Failed":
            return pods[0]
        return None

    pod = wait_for(finished, timeout=60, what="the GPU pod to finish")
    assert pod.spec.node_name in ("gpu-node-1", "gpu-node-2")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 7
    assert terminated.message.strip() == "trained well"
    job = wait_for(
        lambda: next((c for c in kube.batch.read_namespaced_job("gpu", namespace).status.conditions or []
                      if c.type == "Failed" and c.status == "True"), None),
        timeout=30, what="the Job to fail",
    )  # fmt: skip
    assert job.reason == "BackoffLimitExceeded"


def test_pod_sees_its_volumes_at_their_mount_paths(kube: Kube, namespace: str) -> None:
    data = kube.create_pvc(namespace, "data")
    (data / "input.txt").write_text("from the claim")
    kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"job.yaml": "hello"}})
    job = gpu_job(
        "volumes",
        gpus=1,
        command=[
            "sh",
            "-c",
            "cat /etc/finetune/job.yaml /data/in/input.txt > /data/in/out.txt && sleep 3 && touch /cfg-ro/x",
        ],
    )
    host = {path: Path(path).exists() for path in ("/cfg-ro", "/data", "/etc/finetune")}
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
    ]
    pod["containers"][0]["volumeMounts"] = [
        {"name": "cfg", "mountPath": "/etc/finetune", "readOnly": True},
        {"name": "data", "mountPath": "/data/in"},
        {"name": "cfg", "mountPath": "/cfg-ro", "readOnly": True},
    ]
    kube.batch.create_namespaced_job(namespace, job)
    wait_for((data / "out.txt").is_file, timeout=60, what="the pod to write through its claim")
    assert (data / "out.txt").read_text() == "hellofrom the claim"
    # Its mount points are made in its own view only, never on the host (here while it runs).
    assert {path: Path(path).exists() for path in host} == host
    # A read-only mount refuses writes, so the command fails after writing out.txt.
    pods = wait_for(
        lambda: [p for p in kube.pods(namespace, "job-name=volumes") if p.status.phase == "Failed"],
        timeout=30, what="the read-only write to fail",
    )  # fmt: skip
    assert pods[0].status.container_statuses[0].state.terminated.exit_code != 0
    assert {path: Path(path).exists() for path in host} == host


def test_a_claims_folder_is_writable_by_the_trainers_uid_as_on_a_real_node(kube: Kube, namespace: str) -> None:
    """A real kubelet mounts the provisioner's hostPath folder as it is (no fsGroup for hostPath),
    and the trainer image runs as uid 1000: a folder made 0755 by root failed every job there
    with "Permission denied: '/data/outputs/demo'". The node agent runs pods as its own user, so
    the folder's mode is what it must get right."""
    data = kube.create_pvc(namespace, "shared")
    assert data.stat().st_mode & 0o777 == 0o777


def test_a_read_only_root_refuses_writes_but_to_volumes_as_a_runtime_does(kube: Kube, namespace: str) -> None:
    """readOnlyRootFilesystem on the node agent as in a real container: a write outside the
    volumes fails (read-only file system), writes to a claim, an emptyDir and the
    termination-message file succeed."""
    data = kube.create_pvc(namespace, "data")
    Path("/var/tmp/written-by-a-pod").unlink(missing_ok=True)
    script = (
        "echo out > /data/out.txt && echo scratch > /scratch/s && "
        'echo "kept" > /dev/termination-log && echo "$FINETUNE_TERMINATION_LOG" > /data/log-path && '
        "if touch /var/tmp/written-by-a-pod 2>/data/refused; then exit 0; else exit 9; fi"
    )
    job = gpu_job("read-only", gpus=1, command=["sh", "-c", script])
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    container = pod["containers"][0]
    container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}, {"name": "scratch", "mountPath": "/scratch"}]
    container["securityContext"] = {"readOnlyRootFilesystem": True}
    kube.batch.create_namespaced_job(namespace, job)
    pods = wait_for(
        lambda: [p for p in kube.pods(namespace, "job-name=read-only") if p.status.phase in ("Failed", "Succeeded")],
        timeout=60, what="the read-only pod to end",
    )  # fmt: skip
    terminated = pods[0].status.container_statuses[0].state.terminated
    assert not Path("/var/tmp/written-by-a-pod").exists()
    assert (data / "out.txt").read_text() == "out\n"
    assert "Read-only file system" in (data / "refused").read_text()
    assert terminated.exit_code == 9, terminated
    assert terminated.message.strip() == "kept"


def test_a_container_that_cannot_be_created_waits_with_the_kubelets_reason(kube: Kube, namespace: str) -> None:
    """A mount the node cannot make (one file of a ConfigMap over a directory) is no exit code of
    the container's: the pod stays Pending, the container waiting with CreateContainerError and
    the message, as a kubelet reports it."""
    kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"job.yaml": "hello"}})
    job = gpu_job("uncreatable", gpus=1, command=["true"])
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}}]
    pod["containers"][0]["volumeMounts"] = [{"name": "cfg", "mountPath": "/etc", "subPath": "job.yaml"}]
    kube.batch.create_namespaced_job(namespace, job)

    def waiting() -> Any:
        pods = kube.pods(namespace, "job-name=uncreatable")
        statuses = (pods[0].status.container_statuses or []) if pods else []
        state = statuses[0].state.waiting if statuses else None
        return pods[0] if state is not None and state.reason == "CreateContainerError" else None

    created = wait_for(waiting, timeout=60, what="CreateContainerError")
    assert created.status.phase == "Pending"
    state = created.status.container_statuses[0].state
    assert state.terminated is None and state.running is None
    assert "/etc" in state.waiting.message and "cannot mount" in state.waiting.message


def test_three_gpus_stay_pending_with_the_schedulers_reason(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(namespace, gpu_job("big", gpus=3, command=["true"]))

    def unschedulable() -> Any:
        for pod in kube.pods(namespace, "job-name=big"):
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                    return condition
        return None

    condition = wait_for(unschedulable, timeout=60, what="the scheduler to refuse the pod")
    assert "Insufficient nvidia.com/gpu" in condition.message
    assert kube.pods(namespace, "job-name=big")[0].status.phase == "Pending"


def test_deleting_a_job_stops_and_removes_its_pods(kube: Kube, namespace: str) -> None:
    kube.batch.create_namespaced_job(namespace, gpu_job("long", gpus=1, command=["sleep", "300"]))
    wait_for(
        lambda: [p for p in kube.pods(namespace, "job-name=long") if p.status.phase == "Running"],
        timeout=60, what="the pod to run",
    )  # fmt: skip
    kube.batch.delete_namespaced_job("long", namespace, propagation_policy="Background")
    wait_for(lambda: not kube.pods(namespace, "job-name=long"), timeout=60, what="the pods to be collected")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_cluster_up_then_down_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    command = [sys.executable, "-m", "finetune_devcluster"]
    started = time.monotonic()
    up = subprocess.run(
        [*command, "up", "--state-dir", str(state)], capture_output=True, text=True, timeout=120, check=False
    )
    took = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    assert "KUBECONFIG" in up.stdout
    nodes = subprocess.run(
        ["kubectl", f"--kubeconfig={state / 'kubeconfig'}", "get", "nodes"], capture_output=True, text=True, check=True
    ).stdout
    assert "gpu-node-1" in nodes
    assert _processes_mentioning(str(state)), "nothing was running"
    down = subprocess.run(
        [*command, "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=120, check=False
    )
    assert down.returncode == 0, down.stderr
    assert _processes_mentioning(str(state)) == []
    print(f"control plane up in {took:.1f}s")
