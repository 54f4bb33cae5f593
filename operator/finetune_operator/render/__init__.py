"""FineTuneJob -> the batch/v1 Job that runs it.  Pure functions: no API calls, tested
without a cluster.

One object, created in one API call.  ``render()`` starts from the trainer's Job and lets one
builder per concern shape it, each a function of the parsed spec and the operator's settings
with its tests beside it:

- ``job_file``: the resolved FineTuneJob at ``/etc/finetune/job.yaml``, from an annotation;
- ``report_channel``: the report URL, the audience-bound token, the CA, the termination message;
- ``storage``: the claims of pvc:// URIs, read-write only where the trainer writes;
- ``security``: non-root, no capabilities, no Kubernetes token, credentials as files;
- ``placement``: GPUs, CPU and memory, node selector, tolerations, affinity, priority class;
- ``failure_policy``: retries, what fails the Job at once, what is not the job's fault, deadline;
- ``kueue``: the queue and priority labels, created suspended.

Fields and named list items (env, volumes, mounts) stay in the order the builders add them: it
means nothing to the apiserver or the kubelet (no env value refers to another with ``$(...)``),
and the golden tests compare the Jobs as parsed objects with those lists by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_api.contract import (
    ANNOTATION_FULL_NAME,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    REPORT_AUDIENCE,
    trainer_command,
)
from finetune_api.job_policy import PlacementProfile
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator.render.failure_policy import add_failure_policy
from finetune_operator.render.job_file import add_job_file, resolved_manifest
from finetune_operator.render.kueue import queue_in_kueue
from finetune_operator.render.placement import DEFAULT_GPU_RESOURCE, place_pod
from finetune_operator.render.report_channel import add_report_channel, report_url
from finetune_operator.render.security import mount_credentials, restrict_pod
from finetune_operator.render.storage import (
    ClaimMount,
    claim_mounts,
    cluster_problems,
    display_uri,
    mount_claims,
    resolve_uri,
    split_pvc,
)
from finetune_operator.render.trainer import labels_for, owner_reference, pod_spec, trainer_job

__all__ = [
    "ANNOTATION_FULL_NAME",
    "KUEUE_PRIORITY_LABEL",
    "KUEUE_QUEUE_LABEL",
    "ClaimMount",
    "Rendered",
    "claim_mounts",
    "cluster_problems",
    "display_uri",
    "labels_for",
    "owner_reference",
    "render",
    "report_url",
    "resolve_uri",
    "resolved_manifest",
    "split_pvc",
    "trainer_command",
]


@dataclass(frozen=True)
class Rendered:
    job: dict[str, Any]
    mounts: tuple[ClaimMount, ...]


def render(
    body: dict[str, Any],
    job: FineTuneJob,
    *,
    trainer_image: str,
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
    default_tolerations: Sequence[dict[str, Any]] = (),
    profile: PlacementProfile | None = None,
    report_base_url: str = "",
    report_audience: str = REPORT_AUDIENCE,
    image_pull_policy: str = "IfNotPresent",
    image_pull_secrets: Sequence[str] = (),
    cache_size_limit: str = "",
    tmp_size_limit: str = "",
    trainer_uid: int = 1000,
    report_ca: str = "",
) -> Rendered:
    """Render the Job of the FineTuneJob ``body`` (parsed as ``job``)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = job.spec
    mounts = claim_mounts(job)

    batch_job = trainer_job(
        name=name,
        namespace=namespace,
        uid=uid,
        image=spec.image or trainer_image,
        image_pull_policy=image_pull_policy,
        shm_size=spec.resources.shm,
        cache_size_limit=cache_size_limit,
        tmp_size_limit=tmp_size_limit,
    )
    if image_pull_secrets:
        pod_spec(batch_job)["imagePullSecrets"] = [{"name": secret} for secret in image_pull_secrets]
    add_job_file(batch_job, job, namespace=namespace, name=name, uid=uid)
    add_report_channel(
        batch_job, namespace=namespace, name=name, base_url=report_base_url, audience=report_audience, ca=report_ca
    )
    mount_credentials(batch_job, spec.base_model.credentials_secret)
    mount_claims(batch_job, mounts)
    place_pod(
        batch_job, spec.resources, gpu_resource=gpu_resource, default_tolerations=default_tolerations, profile=profile
    )
    add_failure_policy(batch_job, spec.run_policy)
    restrict_pod(batch_job, trainer_uid=trainer_uid)
    queue_in_kueue(batch_job, spec.run_policy)
    return Rendered(job=batch_job, mounts=mounts)
