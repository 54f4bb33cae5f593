"""The Job every FineTuneJob starts from: one pod running the trainer, with scratch space.

What varies with a concern (the job file, where it reports, what it mounts, where it runs, how
it fails, what it may do, how it queues) each builder of this package adds to it.
"""

from __future__ import annotations

from typing import Any

from finetune_api.contract import (
    ANNOTATION_FULL_NAME,
    ANNOTATION_OPERATOR_VERSION,
    CACHE_DIR,
    CONTAINER_NAME,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_JOB,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    trainer_command,
)
from finetune_api.v1alpha1 import API_VERSION, KIND
from finetune_operator import __version__, names

Manifest = dict[str, Any]

SHM_VOLUME = "dshm"
CACHE_VOLUME = "cache"
TMP_VOLUME = "tmp"


def labels_for(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": names.label_value(name),
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "finetune",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB_NAME: names.label_value(name),
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pod_spec(job: Manifest) -> Manifest:
    spec: Manifest = job["spec"]["template"]["spec"]
    return spec


def trainer_container(job: Manifest) -> Manifest:
    return next(c for c in pod_spec(job)["containers"] if c["name"] == CONTAINER_NAME)


def trainer_job(
    *,
    name: str,
    namespace: str,
    uid: str,
    image: str,
    image_pull_policy: str,
    shm_size: str,
    cache_size_limit: str = "",
    tmp_size_limit: str = "",
) -> Manifest:
    """The batch/v1 Job of the FineTuneJob ``namespace/name``: owned by it, labelled as ours."""
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": image_pull_policy,
        # No launcher in front: the trainer starts its workers itself, so that its exit codes
        # reach the podFailurePolicy unchanged.
        "command": trainer_command(),
        "env": [
            {"name": ENV_JOB, "value": f"{namespace}/{name}"},
            {"name": ENV_ATTEMPT, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
            {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "volumeMounts": [
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
            {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    pod = {
        "containers": [container],
        "volumes": [
            # The data loaders' workers hand batches over in shared memory; the container runtime's
            # 64Mi default is too small for them.
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
            # Bounded on a shared node: past its limit the kubelet evicts this pod, not its neighbours.
            {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": cache_size_limit} if cache_size_limit else {}},
            {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": tmp_size_limit} if tmp_size_limit else {}},
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": names.job_name(name),
            "namespace": namespace,
            "labels": labels_for(name),
            # Labels and the Job's name are cut to 63 characters; the full name stays here.
            "annotations": {ANNOTATION_FULL_NAME: name, ANNOTATION_OPERATOR_VERSION: __version__},
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "template": {
                "metadata": {"labels": labels_for(name), "annotations": {ANNOTATION_FULL_NAME: name}},
                "spec": pod,
            },
        },
    }
