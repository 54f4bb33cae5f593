"""The whole system: kubectl apply -> operator -> Job -> node agent -> the real trainer -> status.

Every job here trains the tiny pipeline for real on CPU through the pod the operator renders
(mounts, job file, token, termination message), in a namespace of its own.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION
from tests.jobs import job_manifest, kill_trainer, prepare_claims, trainer_processes
from tests.kube import BackgroundWatch, Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.e2e


class PhaseRecorder:
    """Every phase and step a watch on one FineTuneJob sees, in order."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.phases: list[str] = []
        self.steps: list[int] = []

        def seen(obj: dict[str, Any]) -> None:
            status = obj.get("status") or {}
            phase = status.get("phase")
            if phase and (not self.phases or self.phases[-1] != phase):
                self.phases.append(phase)
            step = (status.get("progress") or {}).get("step")
            if step is not None and (not self.steps or self.steps[-1] != step):
                self.steps.append(step)

        self._watch = BackgroundWatch(
            kube.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            on_event=seen,
        )

    def stop(self) -> None:
        self._watch.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_step(kube: Kube, namespace: str, name: str, at_least: int, timeout: float = 120) -> dict[str, Any]:
    return kube.wait_status(
        namespace,
        name,
        lambda s: s.get("progress", {}).get("step", 0) >= at_least,
        timeout=timeout,
        what=f"past step {at_least}",
    )


def pod_logs(kube: Kube, namespace: str) -> str:
    root = kube.cluster.state_dir / "pods"
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.glob(f"{namespace}_*/trainer.log")))


def test_happy_path_phases_progress_checkpoints_and_outputs(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest("happy", training={"maxSteps": 400}, checkpoints={"everySteps": 100, "keepLast": 2})
    recorder = PhaseRecorder(kube, namespace, "happy")
    try:
        kube.create_ftj(namespace, manifest)
        status = kube.wait_phase(namespace, "happy", "Succeeded", "Failed", timeout=600)
        time.sleep(0.5)
    finally:
        recorder.stop()
    assert status["phase"] == "Succeeded", status
    order = ["Pending", "Queued", "Initializing", "Training", "Exporting", "Succeeded"]
    seen = [p for p in recorder.phases if p in order]
    assert seen == sorted(seen, key=order.index), recorder.phases
    assert {"Initializing", "Training", "Succeeded"} <= set(seen)
    # Live progress: several distinct steps while training, not just the end.
    assert len([s for s in recorder.steps if 0 < s < 400]) >= 2, recorder.steps
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 400
    assert status["attempts"] == 1

    checkpoints = status["checkpoints"]
    assert [c["step"] for c in checkpoints] == [300, 400]
    for checkpoint in checkpoints:
        assert checkpoint["uri"].startswith("pvc://outputs/happy/checkpoints/")
        assert (paths["outputs"] / checkpoint["uri"].removeprefix("pvc://outputs/")).is_dir()

    output = status["output"]
    assert output["uri"] == "pvc://outputs/happy"
    files = {f["path"]: f for f in output["files"]}
    assert "happy.safetensors" in files and "diffusers/model_index.json" in files
    for path, entry in files.items():
        local = paths["outputs"] / "happy" / path
        assert local.stat().st_size == entry["sizeBytes"], path
        assert sha256(local) == entry["sha256"], path

    import torch
    from diffusers import StableDiffusionPipeline

    # Saved in fp16 (halfPrecision); a CPU computes in fp32.
    pipe = StableDiffusionPipeline.from_pretrained(
        paths["outputs"] / "happy" / "diffusers", safety_checker=None, dtype=torch.float32
    )
    image = pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)

    # What the trainer found in the dataset, as kubectl describe shows it.
    assert status["dataset"]["layout"] == "folder" and status["dataset"]["images"] > 0, status.get("dataset")
    described = kube.kubectl("-n", namespace, "describe", "ftj", "happy")
    assert "happy.safetensors" in described
    # The status follows the spec in describe's output: the last "Dataset:" is what was found,
    # its own fields indented as its "Caption Coverage:" is (a concept's are deeper).
    found = described[described.rindex("Dataset:") :]
    images = status["dataset"]["images"]
    assert re.search(rf"\n( +)Caption Coverage: .*\n(?:.*\n)*?\1Images: +{images}\n", found), found
    assert re.search(r"\n( +)Caption Coverage: .*\n(?:.*\n)*?\1Layout: +folder\n", found), found
    assert "Succeeded" in described
    printed = kube.kubectl("-n", namespace, "get", "ftj", "happy").splitlines()[1]
    assert "Succeeded" in printed and "400/400 (100%)" in printed


def test_bad_input_fails_once_with_the_reason(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    junk = paths["datasets"] / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a picture")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    manifest = job_manifest("bad", dataset={"instanceImages": "pvc://datasets/junk/"})
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, "bad", "Failed", "Succeeded", timeout=120)
    assert (status["phase"], status["reason"]) == ("Failed", "BadInput"), status
    assert "instanceImages" in status["message"]
    assert (
        "broken.png" in status["message"]
        or "no usable" in status["message"].lower()
        or "no images" in status["message"].lower()
    ), status["message"]
    assert status["attempts"] == 1
    time.sleep(2)
    assert len(kube.pods(namespace, "finetune.dev/job-name=bad")) == 1
    events = kube.kubectl("-n", namespace, "get", "events", "--field-selector", "involvedObject.name=bad")
    assert "BadInput" in events


def test_killed_trainer_is_retried_and_resumes_from_its_checkpoint(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest("resumed", training={"maxSteps": 600}, checkpoints={"everySteps": 100, "keepLast": 10})
    created = time.monotonic()
    kube.create_ftj(namespace, manifest)
    kube.wait_status(namespace, "resumed", lambda s: s.get("checkpoints"), timeout=180, what="a first checkpoint")
    assert kill_trainer(namespace, "resumed") >= 1
    checkpoint_root = paths["outputs"] / "resumed" / "checkpoints"
    before = {
        d.name: {f.name: sha256(f) for f in d.iterdir() if f.is_file()}
        for d in sorted(checkpoint_root.iterdir())
        if not d.name.startswith(".")
    }
    assert before, "no complete checkpoint on the volume at the kill"
    status = kube.wait_phase(namespace, "resumed", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 600
    assert status["attempts"] == 2
    wall = time.monotonic() - created
    # status.usage: both attempts' running time, within the time the test measured.
    used = status["usage"]
    assert [p["seconds"] > 0 for p in used["pods"]] == [True, True], used
    assert used["gpuSeconds"] == pytest.approx(used["gpus"] * sum(p["seconds"] for p in used["pods"]), abs=0.2)
    assert 0 < used["gpuSeconds"] <= used["gpus"] * wall
    assert used["gpuProduct"] == "Local-Simulated-GPU"
    assert used["cost"] == pytest.approx(used["gpuSeconds"] / 100, abs=0.01)
    assert used["currency"] == "USD"
    # The retry continued from a checkpoint of the first attempt, not from step 0.
    logs = pod_logs(kube, namespace)
    assert "resuming from" in logs, logs[-2000:]
    # Checkpoints of the first attempt are intact.
    for name, files in before.items():
        assert {f.name: sha256(f) for f in (checkpoint_root / name).iterdir() if f.is_file()} == files, name
    assert not [d for d in checkpoint_root.iterdir() if d.name.startswith(".")], "a half-written checkpoint is left"


def test_suspend_mid_training_then_resume_continues_from_the_checkpoint(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest("paused", training={"maxSteps": 600}, checkpoints={"everySteps": 100, "keepLast": 3})
    kube.create_ftj(namespace, manifest)
    kube.wait_status(namespace, "paused", lambda s: s.get("checkpoints"), timeout=180, what="a first checkpoint")
    kube.patch_ftj(namespace, "paused", {"spec": {"runPolicy": {"suspend": True}}})
    status = kube.wait_phase(namespace, "paused", "Suspended", "Succeeded", timeout=60)
    if status["phase"] == "Succeeded":
        pytest.fail("training finished before the suspension took effect: make the job longer")
    wait_for(lambda: not trainer_processes(namespace, "paused"), timeout=60, what="the trainer to stop")
    wait_for(lambda: not kube.pods(namespace, "finetune.dev/job-name=paused"), timeout=60, what="no pods")
    stopped_at = kube.status(namespace, "paused")["progress"]["step"]
    assert kube.status(namespace, "paused")["phase"] == "Suspended"
    time.sleep(2)  # the status write of the pod's end
    used_before = kube.status(namespace, "paused").get("usage", {}).get("gpuSeconds", 0)
    time.sleep(5)  # suspended: no pod, so no GPU time, however long it waits
    assert kube.status(namespace, "paused").get("usage", {}).get("gpuSeconds", 0) == used_before

    kube.patch_ftj(namespace, "paused", {"spec": {"runPolicy": {"suspend": False}}})
    resumed = time.monotonic()
    kube.wait_phase(namespace, "paused", "Pending", "Initializing", "Training", "Exporting", "Succeeded", timeout=30)
    status = kube.wait_phase(namespace, "paused", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == 600
    assert stopped_at < 600
    assert "resuming from" in pod_logs(kube, namespace)
    # status.usage: the suspended time is in neither attempt.
    used = status["usage"]
    assert len(used["pods"]) == 2 and used_before > 0, used
    assert used["gpus"] * used["pods"][0]["seconds"] == pytest.approx(used_before, abs=0.2)
    assert 0 < used["pods"][1]["seconds"] <= time.monotonic() - resumed


def test_delete_mid_training_stops_it_and_keeps_what_was_written(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest("deleted", training={"maxSteps": 5000}, checkpoints={"everySteps": 100, "keepLast": 5})
    kube.create_ftj(namespace, manifest)
    kube.wait_status(namespace, "deleted", lambda s: s.get("checkpoints"), timeout=180, what="a first checkpoint")
    kube.kubectl("-n", namespace, "delete", "ftj", "deleted", "--wait=true", "--timeout=60s")
    wait_for(lambda: not trainer_processes(namespace, "deleted"), timeout=90, what="the trainer process to stop")
    selector = "finetune.dev/job-name=deleted"
    wait_for(
        lambda: (
            not (
                kube.batch.list_namespaced_job(namespace, label_selector=selector).items
                or kube.pods(namespace, selector)
                or kube.core.list_namespaced_config_map(namespace, label_selector=selector).items
                or kube.core.list_namespaced_secret(namespace, label_selector=selector).items
            )
        ),
        timeout=60,
        what="the owned objects to be collected",
    )
    kept = [d for d in (paths["outputs"] / "deleted" / "checkpoints").iterdir() if not d.name.startswith(".")]
    assert kept, "the checkpoints written before the delete are gone"


def test_second_job_waits_for_the_one_gpu_node_then_runs(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    on_node_1 = {"nodeSelector": {"kubernetes.io/hostname": "gpu-node-1"}, "cpu": "1", "memory": "2Gi", "gpus": 1}
    first = job_manifest("first", training={"maxSteps": 1500}, resources=on_node_1)
    second = job_manifest("second", training={"maxSteps": 50}, resources=on_node_1)
    kube.create_ftj(namespace, first)
    kube.wait_phase(namespace, "first", "Training", timeout=120)
    kube.create_ftj(namespace, second)
    queued = kube.wait_phase(namespace, "second", "Queued", timeout=60)
    assert queued["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in queued["message"]
    assert kube.status(namespace, "first")["phase"] in ("Training", "Exporting")
    first_done = kube.wait_phase(namespace, "first", "Succeeded", "Failed", timeout=600)
    assert first_done["phase"] == "Succeeded"
    second_done = kube.wait_phase(namespace, "second", "Succeeded", "Failed", timeout=600)
    assert second_done["phase"] == "Succeeded", second_done
    # Its pod started only after the first job's pod had ended.
    first_pod = kube.pods(namespace, "finetune.dev/job-name=first")[0]
    second_pod = kube.pods(namespace, "finetune.dev/job-name=second")[0]
    first_end = first_pod.status.container_statuses[0].state.terminated.finished_at
    second_start = second_pod.status.container_statuses[0].state.terminated.started_at
    assert second_start >= first_end


def test_an_evicted_pod_is_retried_without_using_the_retry_budget(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    prepare_claims(kube, namespace, tiny_assets)
    # backoffLimit 0: a failure that counted would fail the job at once.
    manifest = job_manifest(
        "evicted",
        training={"maxSteps": 600},
        checkpoints={"everySteps": 100, "keepLast": 2},
        runPolicy={"backoffLimit": 0},
    )
    kube.create_ftj(namespace, manifest)
    kube.wait_phase(namespace, "evicted", "Training", timeout=300)
    pod = kube.pods(namespace, "finetune.dev/job-name=evicted")[0]
    kube.core.create_namespaced_pod_eviction(
        pod.metadata.name,
        namespace,
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod.metadata.name, "namespace": namespace},
        },
    )
    status = kube.wait_phase(namespace, "evicted", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2
    assert status["progress"]["step"] == 600
    job = kube.batch.read_namespaced_job("evicted", namespace)
    assert (job.status.failed or 0) == 0  # the disruption did not count against backoffLimit


def test_a_ttl_of_zero_cannot_take_a_result_the_operator_has_not_recorded(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    """The operator is down when the trainer finishes: the Job (and the pod's termination
    message, the record) must wait for it, however short the TTL."""
    paths = prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest(
        "ttl",
        training={"maxSteps": 600},
        checkpoints={"everySteps": 0, "keepLast": 1},
        runPolicy={"ttlSecondsAfterFinished": 0},
    )
    kube.create_ftj(namespace, manifest)
    wait_step(kube, namespace, "ttl", 1, timeout=180)
    try:
        operator.stop()
        if not trainer_processes(namespace, "ttl"):
            pytest.fail("the trainer finished before the operator stopped: make the job longer")
        wait_for(lambda: not trainer_processes(namespace, "ttl"), timeout=600, what="the trainer to finish")

        def ended() -> bool:
            jobs = kube.batch.list_namespaced_job(namespace, field_selector="metadata.name=ttl").items
            # Complete, or (with the TTL set at creation, as before) already deleted.
            return not jobs or any(c.type == "Complete" and c.status == "True" for c in jobs[0].status.conditions or [])

        wait_for(ended, timeout=120, what="the Job to complete")
    finally:
        operator.start()
    status = kube.wait_phase(namespace, "ttl", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded", status
    files = {f["path"]: f for f in status["output"]["files"]}
    assert files["ttl.safetensors"]["sha256"] == sha256(paths["outputs"] / "ttl" / "ttl.safetensors")
    assert status["progress"]["step"] == 600
    # Recorded: now the TTL applies, and the result stays on the resource.
    wait_for(
        lambda: not kube.batch.list_namespaced_job(namespace, field_selector="metadata.name=ttl").items,
        timeout=60,
        what="the TTL to delete the Job",
    )
    after = kube.status(namespace, "ttl")
    assert (after["phase"], after["output"]["files"]) == ("Succeeded", status["output"]["files"])


def test_credentials_reach_the_trainer_as_files_never_as_its_environment(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    import uuid

    prepare_claims(kube, namespace, tiny_assets)
    value = f"hf_{uuid.uuid4().hex}"
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "hub"}, "stringData": {"HF_TOKEN": value}})
    manifest = job_manifest("creds", training={"maxSteps": 2000}, baseModel={"credentialsSecret": "hub"})
    kube.create_ftj(namespace, manifest)
    wait_step(kube, namespace, "creds", 1, timeout=180)
    pids = trainer_processes(namespace, "creds")
    assert pids
    for pid in pids:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        assert value.encode() not in environment and b"HF_TOKEN=" not in environment
    # The pod sees the Secret as a file where the trainer looks (in its own mount namespace;
    # through /proc an absolute link such as /var/run -> /run would leave it, so resolve first).
    inside = Path("/var/run/finetune/credentials/HF_TOKEN").resolve().relative_to("/")
    mounted = Path(f"/proc/{pids[0]}/root") / inside
    assert mounted.read_text() == value
    kube.kubectl("-n", namespace, "delete", "ftj", "creds", "--wait=false")

    # A Secret named but missing: bad input at once, naming the field, not a silent wait.
    kube.create_ftj(namespace, job_manifest("nosecret", baseModel={"credentialsSecret": "absent"}))
    status = kube.wait_phase(namespace, "nosecret", "Failed", "Succeeded", timeout=180)
    assert (status["phase"], status["reason"]) == ("Failed", "BadInput"), status
    assert status["message"].startswith("spec.baseModel.credentialsSecret: the Secret absent does not exist")


def test_a_uri_with_a_password_or_a_signed_query_shows_without_them(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    """Where a status message, an Event, the web page or a log repeats a URI of the spec, it
    leaves out the user-info and the query string."""
    import json
    import urllib.request

    prepare_claims(kube, namespace, tiny_assets)
    # An address that answers 404 (the operator's web port), so the trainer names the URI.
    uri = f"http://nick:hunter2@127.0.0.1:{operator.web_port}/nope/model.safetensors?X-Amz-Signature=deadbeef"
    manifest = job_manifest("secretive", baseModel={"uri": uri})
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, "secretive", "Failed", "Succeeded", timeout=180)
    assert status["phase"] == "Failed", status
    assert f"127.0.0.1:{operator.web_port}/nope/model.safetensors" in status["message"], status
    events = kube.kubectl("-n", namespace, "get", "events", "-o", "json")
    request = urllib.request.Request(
        f"http://127.0.0.1:{operator.web_port}/api/jobs/{namespace}/secretive",
        headers={"Authorization": f"Bearer {kube.cluster.admin_token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    shown = {
        "status": json.dumps(status),
        "events": events,
        "web page": page,
        "trainer log": pod_logs(kube, namespace),
        "operator log": operator.log.read_text(),
    }
    for where, text in shown.items():
        assert "hunter2" not in text and "deadbeef" not in text, where
