"""The operator against the real control plane: objects, phases, suspension, names, deletion,
restarts.  These jobs never need the trainer to succeed (see tests/e2e for that)."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.bad_specs import good_manifest
from tests.kube import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


def portrait(name: str = "nick-portrait") -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "examples" / "portrait.yaml").read_text())
    manifest["metadata"] = {"name": name}
    # No such Secret here: the pod would wait for it.  Keep the rest as the tutorial has it.
    del manifest["spec"]["baseModel"]["credentialsSecret"]
    return manifest


def owned_by(obj: Any, uid: str) -> bool:
    return any(ref.uid == uid and ref.controller for ref in obj.metadata.owner_references or [])


def test_portrait_gets_its_objects_and_a_phase_at_once(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    created = kube.create_ftj(namespace, portrait())
    uid = created["metadata"]["uid"]
    started = time.monotonic()
    wait_for(lambda: kube.status(namespace, "nick-portrait").get("phase"), timeout=10, what="a phase")
    assert time.monotonic() - started < 10
    printed = kube.kubectl("-n", namespace, "get", "ftj")
    assert "nick-portrait" in printed.splitlines()[1]
    assert printed.splitlines()[0].split() == ["NAME", "PHASE", "PROGRESS", "ETA", "LOSS", "REASON", "QUEUE", "AGE"]
    # Not in `kubectl get all` (built-in workloads only, as kubectl's convention has it); in `get ml`.
    everything = kube.kubectl("-n", namespace, "get", "all", "-o", "name").split()
    assert "job.batch/nick-portrait" in everything
    assert not [n for n in everything if n.startswith("finetunejob")]
    assert "finetunejob.finetune.dev/nick-portrait" in kube.kubectl("-n", namespace, "get", "ml", "-o", "name")

    job = wait_for(lambda: kube.batch.read_namespaced_job("nick-portrait", namespace), what="the Job")
    assert owned_by(job, uid)
    # One object: the job file rides in the pod template, the report token is projected.
    assert not kube.core.list_namespaced_config_map(namespace, label_selector="finetune.dev/job-name").items
    assert not kube.core.list_namespaced_secret(namespace, label_selector="finetune.dev/job-name").items
    pod = job.spec.template.spec
    assert pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    claims = sorted(v.persistent_volume_claim.claim_name for v in pod.volumes if v.persistent_volume_claim)
    assert claims == ["datasets", "outputs"]
    assert job.spec.pod_failure_policy.rules[0].action == "FailJob"
    job_file = yaml.safe_load(job.spec.template.metadata.annotations["finetune.dev/job-yaml"])
    assert job_file["spec"]["dataset"]["instanceImages"] == "/data/datasets/nick/"


def test_more_gpus_than_any_node_is_queued_with_the_schedulers_reason(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    manifest = good_manifest("too-big")
    manifest["spec"]["resources"] = {"gpus": 4, "cpu": "1", "memory": "1Gi"}
    manifest["spec"]["baseModel"]["uri"] = "s3://nonexistent/model"
    manifest["spec"]["dataset"]["instanceImages"] = "s3://nonexistent/images"
    manifest["spec"]["output"]["uri"] = "s3://nonexistent/out"
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, "too-big", "Queued", timeout=60)
    assert status["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in status["message"]
    described = kube.kubectl("-n", namespace, "describe", "ftj", "too-big")
    assert "Insufficient nvidia.com/gpu" in described


def test_a_100_character_name_works(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    name = "a" * 90 + "-portraits"
    assert len(name) == 100
    manifest = good_manifest(name)
    manifest["spec"]["resources"] = {"gpus": 4}
    kube.create_ftj(namespace, manifest)
    status = kube.wait_phase(namespace, name, "Queued", timeout=60)
    job_name = status["jobName"]
    assert len(job_name) <= 63 and job_name.startswith("aaaa")
    job = kube.batch.read_namespaced_job(job_name, namespace)
    assert job.metadata.annotations["finetune.dev/finetunejob"] == name


def test_deleting_the_finetunejob_removes_everything_it_owns(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    manifest = good_manifest("doomed")
    manifest["spec"]["resources"] = {"gpus": 4}
    kube.create_ftj(namespace, manifest)
    kube.wait_phase(namespace, "doomed", "Queued", timeout=60)
    (pod,) = kube.pods(namespace, "finetune.dev/job-name=doomed")
    # The pods' egress policy (the clouds' metadata services denied) holds the job's pod.
    networking = client.NetworkingV1Api(kube.api_client)
    policy = kube.plain(networking.read_namespaced_network_policy("doomed", namespace))
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod.metadata.labels.items()
    assert "169.254.169.254/32" in json.dumps(policy["spec"]["egress"])
    assert [ref["kind"] for ref in policy["metadata"]["ownerReferences"]] == ["FineTuneJob"]
    kube.kubectl("-n", namespace, "delete", "ftj", "doomed", "--wait=true", "--timeout=30s")

    def gone() -> bool:
        selector = "finetune.dev/job-name=doomed"
        return not (
            kube.batch.list_namespaced_job(namespace, label_selector=selector).items
            or kube.pods(namespace, selector)
            or networking.list_namespaced_network_policy(namespace).items
        )

    wait_for(gone, timeout=60, what="the garbage collector to remove the Job, its pods and its NetworkPolicy")


def test_suspend_and_resume_follow_the_spec(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    manifest = good_manifest("pausable")
    manifest["spec"]["resources"] = {"gpus": 4}
    kube.create_ftj(namespace, manifest)
    kube.wait_phase(namespace, "pausable", "Queued", timeout=60)
    kube.patch_ftj(namespace, "pausable", {"spec": {"runPolicy": {"suspend": True}}})
    status = kube.wait_phase(namespace, "pausable", "Suspended", timeout=30)
    assert "runPolicy.suspend" in status["message"]
    assert kube.batch.read_namespaced_job("pausable", namespace).spec.suspend is True
    wait_for(
        lambda: not kube.pods(namespace, "finetune.dev/job-name=pausable"), timeout=60, what="the pod to be removed"
    )
    kube.patch_ftj(namespace, "pausable", {"spec": {"runPolicy": {"suspend": False}}})
    status = kube.wait_phase(namespace, "pausable", "Queued", "Pending", timeout=30)
    assert kube.batch.read_namespaced_job("pausable", namespace).spec.suspend is False
    wait_for(lambda: kube.pods(namespace, "finetune.dev/job-name=pausable"), timeout=60, what="a new pod")
    suspended = next(c for c in kube.status(namespace, "pausable")["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "False"


def test_restarting_the_operator_changes_nothing(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    manifest = good_manifest("steady")
    manifest["spec"]["resources"] = {"gpus": 4}
    kube.create_ftj(namespace, manifest)
    before = kube.wait_phase(namespace, "steady", "Queued", timeout=60)
    job_uid = kube.batch.read_namespaced_job("steady", namespace).metadata.uid

    operator.stop()
    operator.start()
    time.sleep(3)
    after = kube.status(namespace, "steady")
    assert after["phase"] == before["phase"] and after["reason"] == before["reason"]
    jobs = kube.batch.list_namespaced_job(namespace).items
    assert [j.metadata.uid for j in jobs] == [job_uid]
    ours = [e for e in kube.core.list_namespaced_event(namespace).items if e.source.component == "finetune-operator"]
    assert len([e for e in ours if e.reason == "Queued"]) == 1


def test_a_name_taken_by_someone_else_is_a_conflict_not_a_takeover(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    theirs = {
        "metadata": {"name": "clash"},
        "spec": {
            "suspend": True,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "busybox"}]}},
        },
    }
    kube.batch.create_namespaced_job(namespace, theirs)
    kube.create_ftj(namespace, copy.deepcopy(good_manifest("clash")))

    def conflicted() -> dict[str, Any] | None:
        status = kube.status(namespace, "clash")
        return status if status.get("reason") == "NameConflict" else None

    status = wait_for(conflicted, timeout=30, what="a NameConflict")
    assert "Job named clash" in status["message"]
    job = kube.batch.read_namespaced_job("clash", namespace)
    assert not job.metadata.owner_references
    assert job.spec.template.spec.containers[0].name == "x"


def test_two_replicas_with_leader_election_never_both_act(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """Two more operators with leader election (the shared one is stopped meanwhile): only the
    Lease holder writes; when it stops, the other takes over."""
    from tests.conftest import ARTIFACTS

    operator.stop()
    lease = ["--leader-election", "--lease-namespace=default", f"--lease-name=ha-{namespace}"]
    first = OperatorProcess(
        kubeconfig=kube.cluster.kubeconfig,
        log_dir=ARTIFACTS / "ha" / namespace / "a",
        extra_args=lease,
        env={"POD_NAME": "a"},
    )
    second = OperatorProcess(
        kubeconfig=kube.cluster.kubeconfig,
        log_dir=ARTIFACTS / "ha" / namespace / "b",
        extra_args=lease,
        env={"POD_NAME": "b"},
    )
    try:
        first.start()
        second.start()
        holder = wait_for(
            lambda: kube.kubectl(
                "-n", "default", "get", "lease", f"ha-{namespace}", "-o", "jsonpath={.spec.holderIdentity}"
            ),
            timeout=30,
            what="a leader",
        )
        leader, follower = (first, second) if holder == "a" else (second, first)
        manifest = good_manifest("ha")
        manifest["spec"]["resources"] = {"gpus": 4}
        kube.create_ftj(namespace, manifest)
        kube.wait_phase(namespace, "ha", "Queued", timeout=60)
        assert '"event": "status"' in leader.log.read_text()
        assert '"event": "status"' not in follower.log.read_text()
        assert '"event": "job-created"' not in follower.log.read_text()
        leader.stop()
        wait_for(
            lambda: (
                kube.kubectl(
                    "-n", "default", "get", "lease", f"ha-{namespace}", "-o", "jsonpath={.spec.holderIdentity}"
                )
                == ("b" if holder == "a" else "a")
            ),
            timeout=60,
            what="the follower to take the lease",
        )
        kube.patch_ftj(namespace, "ha", {"spec": {"runPolicy": {"suspend": True}}})
        kube.wait_phase(namespace, "ha", "Suspended", timeout=60)
        assert '"event": "status"' in follower.log.read_text()
    finally:
        first.stop()
        second.stop()
        operator.start()


def events_of(kube: Kube, namespace: str, name: str, reason: str) -> list[Any]:
    return [
        e
        for e in kube.core.list_namespaced_event(namespace).items
        if e.involved_object.name == name and e.reason == reason and e.source.component == "finetune-operator"
    ]


def test_a_job_the_apiserver_refuses_is_named_in_status_and_made_once_the_spec_is_fixed(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    manifest = good_manifest("refused")
    # The CRD passes tolerations through; Kubernetes refuses this one in a Job.
    bad = {"key": "dedicated", "operator": "Exists", "value": "ml", "effect": "NoSchedule"}
    manifest["spec"]["resources"] = {"gpus": 8, "tolerations": [bad]}
    kube.create_ftj(namespace, manifest)

    def rejected() -> dict[str, Any] | None:
        status = kube.status(namespace, "refused")
        return status if status.get("reason") == "JobRejected" else None

    status = wait_for(rejected, timeout=30, what="JobRejected on the resource")
    assert status["phase"] == "Pending"
    assert status["message"].startswith("spec.resources.tolerations: the apiserver refused the Job (")
    assert "value must be empty when `operator` is 'Exists'" in status["message"]
    assert "fix spec.resources.tolerations" in status["message"]
    assert not kube.batch.list_namespaced_job(namespace).items
    # Tried again with a growing pause, not in a tight loop, and one Event, not one a try.
    wait_for(
        lambda: (
            operator.log.read_text().count(f'"namespace": "{namespace}", "name": "refused"') >= 2
            and operator.log.read_text().count('"event": "job-rejected"') >= 2
        ),
        timeout=30,
        what="a second try",
    )
    assert len(events_of(kube, namespace, "refused", "JobRejected")) == 1
    assert "jobName" not in kube.status(namespace, "refused")

    # Fixed: the Job is made at once, not after the pause.
    good = {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
    kube.patch_ftj(namespace, "refused", {"spec": {"resources": {"tolerations": [good]}}})
    fixed = kube.wait_phase(namespace, "refused", "Queued", timeout=15)
    assert fixed["reason"] == "Unschedulable"
    job = kube.batch.read_namespaced_job("refused", namespace)
    assert {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"} in [
        kube.plain(t) for t in job.spec.template.spec.tolerations
    ]


def test_a_job_create_refused_by_a_webhook_that_is_down_is_on_the_resource_and_runs_once_it_is_gone(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """Kueue's webhooks left registered with no Kueue running (a user's `make demo KUEUE=1`, then
    `make demo`): every Job create failed, the operator retried, and the PHASE column stayed
    empty.  A webhook for this namespace's Jobs at a port nothing listens on stands in for it."""
    hook = f"down-{namespace}"
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": hook},
        "webhooks": [
            {
                "name": "mjob.down.example",
                "clientConfig": {"url": "https://127.0.0.1:1/mutate-batch-v1-job"},
                "rules": [
                    {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["jobs"]}
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 2,
            }
        ],
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(webhook))
    try:
        kube.create_ftj(namespace, good_manifest("hooked"))

        def failing() -> dict[str, Any] | None:
            status = kube.status(namespace, "hooked")
            return status if status.get("reason") == "JobCreateFailing" else None

        # Within one retry: on the resource after the first failure.
        status = wait_for(failing, timeout=20, what="JobCreateFailing on the resource")
        assert status["phase"] == "Pending"
        assert 'failed calling webhook "mjob.down.example"' in status["message"]
        # (The first write may meet kopf's own change of the new object and go with the retry.)
        assert re.search(r"; try [23] at \d\d:\d\d:\d\dZ \(in (5|10)s\)$", status["message"]), status["message"]
        assert not kube.batch.list_namespaced_job(namespace).items
        assert len(events_of(kube, namespace, "hooked", "JobCreateFailing")) == 1
    finally:
        kube.kubectl("delete", "mutatingwebhookconfiguration", hook, "--ignore-not-found")
    # The webhook gone, the next try makes the Job, and the reason goes.
    made = wait_for(
        lambda: kube.status(namespace, "hooked") if kube.status(namespace, "hooked").get("jobName") else None,
        timeout=60,
        what="the Job made once the webhook is gone",
    )
    assert made.get("reason") != "JobCreateFailing"
    assert kube.batch.read_namespaced_job("hooked", namespace)


def test_a_job_file_too_big_for_the_pod_template_says_what_to_shorten(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    manifest = good_manifest("bulky")
    pools = [f"pool-{i:05d}-" + "x" * 50 for i in range(5000)]
    term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": pools}]}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    manifest["spec"]["resources"] = {"gpus": 8, "affinity": affinity}
    kube.create_ftj(namespace, manifest)
    status = wait_for(
        lambda: (s := kube.status(namespace, "bulky")).get("reason") == "JobRejected" and s,
        timeout=30,
        what="JobRejected on the resource",
    )
    assert status["message"].startswith("spec: the job file is too big to travel in the pod template")
    assert "spec.resources.affinity" in status["message"]
    assert "262144" in status["message"]  # the apiserver's own words


def test_what_the_job_is_made_from_cannot_change_once_the_job_exists(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """Otherwise status would map the trainer's paths with a spec the running Job never saw."""
    manifest = good_manifest("fixed")
    manifest["spec"]["resources"] = {"gpus": 4}
    kube.create_ftj(namespace, manifest)
    kube.wait_phase(namespace, "fixed", "Queued", timeout=60)
    assert kube.status(namespace, "fixed")["jobName"] == "fixed"
    changes = [
        ({"output": {"uri": "pvc://outputs/elsewhere/"}}, "spec.output"),
        ({"training": {"learningRate": 1.0e-4}}, "spec.training"),
        ({"resources": {"memory": "64Gi"}}, "spec.resources"),
        ({"checkpoints": {"everySteps": 5}}, "spec.checkpoints"),
        ({"samples": {"everySteps": 5}}, "spec.samples"),
        ({"storage": {"s3EndpointUrl": "http://minio:9000"}}, "spec.storage"),
        ({"image": "trainer:other"}, "spec.image"),
        ({"runPolicy": {"backoffLimit": 9}}, "spec.runPolicy.backoffLimit"),
        ({"runPolicy": {"activeDeadlineSeconds": 60}}, "spec.runPolicy.activeDeadlineSeconds"),
        ({"runPolicy": {"queueName": "team-a"}}, "spec.runPolicy.queueName"),
    ]
    for change, field in changes:
        out = kube.kubectl(
            "-n", namespace, "patch", "ftj", "fixed", "--type=merge", "-p", json.dumps({"spec": change}), check=False
        )
        assert f"{field} cannot change once the job's Job exists" in out, (change, out)
        assert "create a new FineTuneJob" in out
    # What a running job may change still changes.
    kube.patch_ftj(namespace, "fixed", {"spec": {"runPolicy": {"ttlSecondsAfterFinished": 60}}})
    kube.patch_ftj(namespace, "fixed", {"spec": {"runPolicy": {"suspend": True}}})
    kube.wait_phase(namespace, "fixed", "Suspended", timeout=30)
