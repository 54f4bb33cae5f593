"""A FineTuneJob owns only the Job made for it: one created again under the same name (after a
delete that kept the old Job, or while the garbage collector is still removing it) never
takes the old Job's result for its own.  And once a job is final, its record stays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune_api.v1alpha1 import GROUP, PLURAL, VERSION
from tests.cluster.test_progress import pod_token, post, report
from tests.e2e.test_lifecycle import sha256
from tests.jobs import job_manifest, prepare_claims
from tests.kube import BackgroundWatch, Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.e2e


class Incarnations:
    """Every (uid, phase) a watch on one FineTuneJob name sees, across deletes and re-creates."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.seen: list[tuple[str, str, str]] = []

        def seen(obj: dict[str, Any]) -> None:
            status = obj.get("status") or {}
            entry = (obj["metadata"]["uid"], status.get("phase") or "", status.get("reason") or "")
            if not self.seen or self.seen[-1] != entry:
                self.seen.append(entry)

        self._watch = BackgroundWatch(
            kube.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            on_event=seen,
        )

    def phases(self, uid: str) -> list[str]:
        return [phase for who, phase, _ in self.seen if who == uid]

    def stop(self) -> None:
        self._watch.stop()


def owner_uid(obj: Any) -> str | None:
    return next((ref.uid for ref in obj.metadata.owner_references or [] if ref.controller), None)


def job_of(kube: Kube, namespace: str, name: str) -> Any:
    jobs = kube.batch.list_namespaced_job(namespace, field_selector=f"metadata.name={name}").items
    return jobs[0] if jobs else None


def test_a_finetunejob_made_again_never_takes_the_old_jobs_result(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    small = {"training": {"maxSteps": 20}, "checkpoints": {"everySteps": 0, "keepLast": 1}, "samples": {"prompts": []}}
    seen = Incarnations(kube, namespace, "a")
    try:
        first = kube.create_ftj(namespace, job_manifest("a", **small))
        assert kube.wait_phase(namespace, "a", "Succeeded", "Failed", timeout=300)["phase"] == "Succeeded"
        old_job = job_of(kube, namespace, "a")
        assert owner_uid(old_job) == first["metadata"]["uid"]

        # Deleted, its completed Job kept (the garbage collector takes the owner reference off).
        kube.kubectl("-n", namespace, "delete", "ftj", "a", "--cascade=orphan", "--wait=true", "--timeout=60s")
        wait_for(lambda: owner_uid(job_of(kube, namespace, "a")) is None, timeout=60, what="the Job orphaned")
        second = kube.create_ftj(namespace, job_manifest("a", **small))
        uid = second["metadata"]["uid"]
        conflict = wait_for(
            lambda: (s := kube.status(namespace, "a")).get("reason") == "NameConflict" and s,
            timeout=30,
            what="the old Job named in status",
        )
        assert conflict["phase"] == "Pending"
        assert f"kubectl -n {namespace} delete job a" in conflict["message"]
        assert job_of(kube, namespace, "a").metadata.uid == old_job.metadata.uid  # not touched
        assert "Succeeded" not in seen.phases(uid)

        # As the status says: delete the old Job; the new FineTuneJob then makes and runs its own.
        kube.batch.delete_namespaced_job("a", namespace, propagation_policy="Background")
        status = kube.wait_phase(namespace, "a", "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status
        job = job_of(kube, namespace, "a")
        assert job.metadata.uid != old_job.metadata.uid and owner_uid(job) == uid
        pods = kube.pods(namespace, f"batch.kubernetes.io/controller-uid={job.metadata.uid}")
        assert [p.status.phase for p in pods] == ["Succeeded"]
        # Its own pod ran before it was Succeeded: never the old Job's result.
        ran = pods[0].status.container_statuses[0].state.terminated
        assert ran.started_at.strftime("%Y-%m-%dT%H:%M:%SZ") <= status["completionTime"]

        # Final: the record is the trainer's own; a report now (with the finished pod's token,
        # which stays good while the pod exists) changes nothing.
        token = pod_token(kube, namespace, pods[0])
        forged = report(20, total=20, stage="done", attempt=pods[0].metadata.name)
        forged["files"] = [{"path": "a.safetensors", "sizeBytes": 1, "sha256": "00" * 32}]
        code, answer = post(operator, namespace, "a", token, forged)
        assert (code, answer["error"]) == (409, "Finished"), answer
        files = {f["path"]: f for f in kube.status(namespace, "a")["output"]["files"]}
        assert files["a.safetensors"]["sha256"] == sha256(paths["outputs"] / "a" / "a.safetensors")

        # Twenty times: delete and create again at once, the garbage collector behind (the first
        # time the old Job is a completed one). Each time, only its own Job.
        waiting = {"training": {"maxSteps": 20}, "resources": {"gpus": 4}}
        uids = []
        for _ in range(20):
            kube.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, "a", propagation_policy="Background"
            )
            created = wait_for(
                lambda: kube.create_ftj(namespace, job_manifest("a", **waiting)),
                timeout=30,
                what="the name free again",
            )
            uid = created["metadata"]["uid"]
            uids.append(uid)

            def settled(uid: str = uid) -> bool:
                job = job_of(kube, namespace, "a")
                status = kube.status(namespace, "a")
                return bool(
                    job is not None
                    and owner_uid(job) == uid
                    and status.get("jobName") == "a"
                    and status.get("phase") == "Queued"
                )

            wait_for(settled, timeout=60, what="the new FineTuneJob with its own Job, queued")
    finally:
        seen.stop()
    wrong = [(u, phase, reason) for u, phase, reason in seen.seen if u in uids and phase in ("Succeeded", "Failed")]
    assert not wrong, wrong
