"""The trainer's Job, before the builders: one pod, one trainer container, owned and labelled."""

from __future__ import annotations

from typing import Any

from finetune_api.contract import ANNOTATION_FULL_NAME, ANNOTATION_OPERATOR_VERSION, trainer_command
from finetune_operator import __version__, names
from finetune_operator.render.trainer import pod_spec, trainer_container, trainer_job


def test_one_pod_runs_the_trainer_command_of_the_image(job: dict[str, Any]) -> None:
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    [container] = pod_spec(job)["containers"]
    assert container is trainer_container(job)
    assert container["name"] == "trainer"
    assert container["command"] == trainer_command()
    assert (container["image"], container["imagePullPolicy"]) == ("trainer:1", "IfNotPresent")
    env = {e["name"]: e for e in container["env"]}
    assert env["FINETUNE_JOB"]["value"] == "team-a/nick-portrait"
    # Each attempt (pod) reports under its own name: a late report of an earlier one cannot overwrite it.
    assert env["FINETUNE_ATTEMPT"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_job_is_owned_by_its_finetunejob_and_labelled_as_ours(job: dict[str, Any]) -> None:
    meta = job["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "nick-portrait",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["namespace"] == "team-a"
    assert meta["annotations"][ANNOTATION_OPERATOR_VERSION] == __version__
    for labels in (meta["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert labels["finetune.dev/job-name"] == "nick-portrait"
    # The Job's labels and the pods' are separate objects: a label added to one is not on the other.
    assert meta["labels"] is not job["spec"]["template"]["metadata"]["labels"]


def test_a_long_name_is_cut_for_the_job_and_labels_but_kept_whole_in_annotations() -> None:
    name = "a" * 200
    job = trainer_job(name=name, namespace="n", uid="u", image="t", image_pull_policy="Always", shm_size="1Gi")
    assert job["metadata"]["name"] == names.job_name(name)
    assert len(job["metadata"]["name"]) <= 63
    assert all(len(v) <= 63 for v in job["metadata"]["labels"].values())
    assert job["metadata"]["annotations"][ANNOTATION_FULL_NAME] == name
    assert job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_FULL_NAME] == name


def test_scratch_space_is_mounted_and_shared_memory_is_sized_by_the_spec() -> None:
    job = trainer_job(name="x", namespace="n", uid="u", image="t", image_pull_policy="Always", shm_size="16Gi")
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in trainer_container(job)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}
    # Downloads (the hub's cache among them) go to a volume of the pod, not the image's layer.
    env = {e["name"]: e.get("value") for e in trainer_container(job)["env"]}
    assert volumes[mounts[env["FINETUNE_CACHE_DIR"]]]["emptyDir"] == {}
    assert env["HF_HOME"].startswith(env["FINETUNE_CACHE_DIR"] + "/")
