"""FineTuneJob -> the batch/v1 Job that runs it.  Pure functions: no API calls, tested
without a cluster.

One object, created in one API call: the resolved job file travels in a pod-template
annotation that a downwardAPI volume turns into ``/etc/finetune/job.yaml``, and the trainer
proves who it is to the operator with a service-account token projected for the operator's
audience and bound to its pod (short-lived, rotated by the kubelet, nothing stored), not with
a per-job Secret.  The operator checks such a token with a TokenReview.
"""

from __future__ import annotations

import copy
import json
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from finetune_api.contract import (
    ANNOTATION_FULL_NAME,
    ANNOTATION_JOB_FILE,
    ANNOTATION_OPERATOR_VERSION,
    ANNOTATION_REPORT_CA,
    CA_FILE,
    CACHE_DIR,
    CONTAINER_NAME,
    CREDENTIALS_DIR,
    DATA_ROOT,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_CREDENTIALS_DIR,
    ENV_CREDENTIALS_SECRET,
    ENV_JOB,
    ENV_REPORT_CA_FILE,
    ENV_REPORT_TOKEN_FILE,
    ENV_REPORT_URL,
    ENV_TERMINATION_LOG,
    JOB_FILE_DIR,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    REPORT_AUDIENCE,
    TERMINATION_LOG,
    TOKEN_DIR,
    TOKEN_FILE,
    TOKEN_SECONDS,
    report_path,
    trainer_command,
)
from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import API_VERSION, KIND, FineTuneJob, cluster_uri_problem, dump_spec
from finetune_operator import __version__, names


@dataclass(frozen=True)
class ClaimMount:
    """One PersistentVolumeClaim the pod mounts, and whether it needs to write to it."""

    claim: str
    path: str
    read_only: bool

    @property
    def volume(self) -> str:
        return names.volume_name(self.claim)


@dataclass(frozen=True)
class Rendered:
    job: dict[str, Any]
    mounts: tuple[ClaimMount, ...]


def split_pvc(uri: str) -> tuple[str, str]:
    """``pvc://claim/some/path/`` -> (``claim``, ``some/path/``)."""
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def claim_mounts(job: FineTuneJob) -> tuple[ClaimMount, ...]:
    """Every claim named by a pvc:// URI; read-write where the trainer writes (output, class images)."""
    spec = job.spec
    uses: list[tuple[str | None, bool]] = [
        (spec.base_model.uri, False),
        (spec.base_model.vae_uri, False),
        # A single-file Flux transformer's text encoders, VAE and scheduler.
        (spec.base_model.components_uri, False),
        (spec.dataset.instance_images, False),
        # Class images generated when missing are saved there for reuse.
        (spec.dataset.class_images, True),
        (spec.output.uri, True),
    ]
    writable: dict[str, bool] = {}
    for uri, writes in uses:
        if uri and uri.startswith("pvc://"):
            claim, _ = split_pvc(uri)
            writable[claim] = writable.get(claim, False) or writes
    return tuple(
        ClaimMount(claim=claim, path=f"{DATA_ROOT}/{claim}", read_only=not writes)
        for claim, writes in sorted(writable.items())
    )


def cluster_problems(job: FineTuneJob) -> list[str]:
    """What a pod cannot use: a plain path or file:// would be the pod's own file system.  The
    CRD refuses them at admission; this is for specs an older CRD admitted."""
    spec = job.spec
    uris = (
        ("spec.baseModel.uri", spec.base_model.uri),
        ("spec.dataset.instanceImages", spec.dataset.instance_images),
        ("spec.dataset.classImages", spec.dataset.class_images),
        ("spec.output.uri", spec.output.uri),
    )
    return [p for field, uri in uris if (p := cluster_uri_problem(uri, field=field)) is not None]


def resolve_uri(uri: str | None) -> str | None:
    """pvc://claim/path -> the path where the pod sees it, never outside the claim's mount."""
    if uri is None or not uri.startswith("pvc://"):
        return uri
    claim, path = split_pvc(uri)
    mount = f"{DATA_ROOT}/{claim}"
    resolved = posixpath.normpath(f"{mount}/{path}")
    if resolved != mount and not resolved.startswith(mount + "/"):
        raise ValueError(f"{uri} leaves the claim {claim}: a pvc:// path may not contain '..'")
    return f"{mount}/{path}" if path else mount


def display_uri(path: str | None, mounts: tuple[ClaimMount, ...] | list[ClaimMount]) -> str | None:
    """The inverse of ``resolve_uri``: a path in the pod -> the pvc:// URI a person can use."""
    if path is None:
        return None
    for mount in mounts:
        if path == mount.path or path.startswith(mount.path + "/"):
            rest = path[len(mount.path) :].lstrip("/")
            return f"pvc://{mount.claim}/{rest}"
    return path


def resolved_manifest(job: FineTuneJob, *, namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The job file the trainer reads: the same FineTuneJob, pvc:// URIs replaced by mount paths."""
    resolved = job.model_copy(deep=True)
    spec = resolved.spec
    spec.base_model.uri = resolve_uri(spec.base_model.uri) or spec.base_model.uri
    spec.base_model.vae_uri = resolve_uri(spec.base_model.vae_uri)
    spec.base_model.components_uri = resolve_uri(spec.base_model.components_uri)
    spec.dataset.instance_images = resolve_uri(spec.dataset.instance_images) or spec.dataset.instance_images
    spec.dataset.class_images = resolve_uri(spec.dataset.class_images)
    spec.output.uri = resolve_uri(spec.output.uri) or spec.output.uri
    body = dump_spec(resolved)
    body.pop("status", None)
    body["apiVersion"] = API_VERSION
    body["kind"] = KIND
    body["metadata"] = {"name": name, "namespace": namespace, "uid": uid}
    return body


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


def _metadata(name: str, namespace: str, uid: str, object_name: str) -> dict[str, Any]:
    return {
        "name": object_name,
        "namespace": namespace,
        "labels": labels_for(name),
        "annotations": {ANNOTATION_FULL_NAME: name},
        "ownerReferences": [owner_reference(name, uid)],
    }


def report_url(base: str, namespace: str, name: str) -> str:
    return f"{base.rstrip('/')}{report_path(namespace, name)}" if base else ""


def render(
    body: dict[str, Any],
    job: FineTuneJob,
    *,
    trainer_image: str,
    gpu_resource: str = "nvidia.com/gpu",
    default_tolerations: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    report_base_url: str = "",
    report_audience: str = REPORT_AUDIENCE,
    image_pull_policy: str = "IfNotPresent",
    trainer_uid: int = 1000,
    report_ca: str = "",
) -> Rendered:
    """Render the Job of the FineTuneJob ``body`` (parsed as ``job``)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = job.spec
    mounts = claim_mounts(job)
    labels = labels_for(name)

    # JSON is YAML too, and renders ten times faster: this runs once per new FineTuneJob.
    job_file = json.dumps(resolved_manifest(job, namespace=namespace, name=name, uid=uid), indent=1)
    template_annotations = {ANNOTATION_FULL_NAME: name, ANNOTATION_JOB_FILE: job_file}
    if report_ca:
        template_annotations[ANNOTATION_REPORT_CA] = report_ca

    resources = spec.resources
    gpu_name = resources.gpu_resource if resources.gpu_resource != "nvidia.com/gpu" else gpu_resource
    env: list[dict[str, Any]] = [
        {"name": ENV_JOB, "value": f"{namespace}/{name}"},
        {"name": ENV_ATTEMPT, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": ENV_REPORT_TOKEN_FILE, "value": TOKEN_FILE},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    url = report_url(report_base_url, namespace, name)
    if url:
        env.insert(0, {"name": ENV_REPORT_URL, "value": url})
    if report_ca:
        env.append({"name": ENV_REPORT_CA_FILE, "value": CA_FILE})
    secret = spec.base_model.credentials_secret
    if secret:
        env += [
            {"name": ENV_CREDENTIALS_DIR, "value": CREDENTIALS_DIR},
            {"name": ENV_CREDENTIALS_SECRET, "value": secret},
        ]

    report_sources: list[dict[str, Any]] = [
        {
            "serviceAccountToken": {
                "audience": report_audience,
                "expirationSeconds": TOKEN_SECONDS,
                "path": "token",
            }
        }
    ]
    if report_ca:
        report_sources.append(
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "ca.crt",
                            "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_REPORT_CA}']"},
                        }
                    ]
                }
            }
        )
    volumes: list[dict[str, Any]] = [
        {
            "name": "job",
            "downwardAPI": {
                "items": [
                    {"path": "job.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_JOB_FILE}']"}}
                ]
            },
        },
        {"name": "report-token", "projected": {"sources": report_sources, "defaultMode": 0o444}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    volume_mounts: list[dict[str, Any]] = [
        {"name": "job", "mountPath": JOB_FILE_DIR, "readOnly": True},
        {"name": "report-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if secret:
        # Optional: a missing Secret leaves the folder empty, and the trainer says so (bad input,
        # naming spec.baseModel.credentialsSecret) instead of the pod waiting without a word.
        volumes.append(
            {"name": "credentials", "secret": {"secretName": secret, "defaultMode": 0o440, "optional": True}}
        )
        volume_mounts.append({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
    for mount in mounts:
        volumes.append(
            {
                "name": mount.volume,
                "persistentVolumeClaim": {"claimName": mount.claim, "readOnly": mount.read_only},
            }
        )
        volume_mounts.append({"name": mount.volume, "mountPath": mount.path, "readOnly": mount.read_only})

    limits: dict[str, str] = {gpu_name: str(resources.gpus), "memory": resources.memory}
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image or trainer_image,
        "imagePullPolicy": image_pull_policy,
        "command": trainer_command(),
        "env": env,
        "resources": {"requests": {"cpu": resources.cpu, "memory": resources.memory}, "limits": limits},
        "volumeMounts": volume_mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }

    tolerations = [copy.deepcopy(t) for t in default_tolerations]
    tolerations += [t for t in resources.tolerations if t not in tolerations]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Trainer pods talk to no Kubernetes API: progress goes to the operator.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": trainer_uid,
            "runAsGroup": trainer_uid,
            "fsGroup": trainer_uid,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": 60,
    }
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.affinity:
        pod_spec["affinity"] = copy.deepcopy(resources.affinity)
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name

    policy = spec.run_policy
    job_labels = dict(labels)
    if policy.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = policy.queue_name
    if policy.priority_class:
        # Kueue's WorkloadPriorityClass: the order of admission and who may preempt whom.
        job_labels[KUEUE_PRIORITY_LABEL] = policy.priority_class
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": policy.backoff_limit,
        # With Kueue the Job starts suspended and Kueue admits it.
        "suspend": bool(policy.suspend or policy.queue_name),
        "podFailurePolicy": {
            "rules": [
                {
                    # Bad input and out-of-memory cannot succeed on a retry.
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": [int(ExitCode.BAD_INPUT), int(ExitCode.OUT_OF_MEMORY)],
                    },
                },
                {
                    # Preemption, eviction, node drain: not the job's fault.
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {
            "metadata": {"labels": dict(labels), "annotations": template_annotations},
            "spec": pod_spec,
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    # No ttlSecondsAfterFinished here: the operator sets it once the final status is written,
    # so that a Job (and its pods' termination messages) outlives an operator that was down.
    job_meta = _metadata(name, namespace, uid, names.job_name(name))
    job_meta["labels"] = job_labels
    job_meta["annotations"][ANNOTATION_OPERATOR_VERSION] = __version__
    batch_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}
    return Rendered(job=batch_job, mounts=mounts)
