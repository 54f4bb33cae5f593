"""Storage mounts: every PersistentVolumeClaim a pvc:// URI names, mounted where the trainer
reads it, read-write only where the trainer writes.  Object stores and hub URIs need no mount;
the trainer fetches them itself."""

from __future__ import annotations

from finetune_api.v1alpha1 import FineTuneJob, cluster_uri_problem
from finetune_operator.claims import ClaimMount, claim_mounts, display_uri, resolve_uri, split_pvc
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

__all__ = [
    "ClaimMount",
    "claim_mounts",
    "cluster_problems",
    "display_uri",
    "mount_claims",
    "resolve_uri",
    "split_pvc",
]


def cluster_problems(job: FineTuneJob) -> list[str]:
    """What a pod cannot use: a plain path or file:// would be the pod's own file system.  The
    CRD refuses them at admission; this is for specs an older CRD admitted."""
    spec = job.spec
    uris = (
        ("spec.baseModel.uri", spec.base_model.uri),
        ("spec.dataset.instanceImages", spec.dataset.instance_images),
        ("spec.dataset.classImages", spec.dataset.class_images),
        ("spec.output.uri", spec.output.uri),
        ("spec.evaluation.clipModel", spec.evaluation.clip_model if spec.evaluation else None),
        ("spec.evaluation.dinoModel", spec.evaluation.dino_model if spec.evaluation else None),
        *(
            (f"spec.dataset.concepts[{i}].{field}", uri)
            for i, concept in enumerate(spec.dataset.concepts or ())
            for field, uri in (("images", concept.images), ("classImages", concept.class_images))
        ),
    )
    return [p for field, uri in uris if (p := cluster_uri_problem(uri, field=field)) is not None]


def mount_claims(job: Manifest, mounts: tuple[ClaimMount, ...]) -> None:
    """One volume and one mount per claim, in the order of ``mounts``."""
    pod, container = pod_spec(job), trainer_container(job)
    for mount in mounts:
        pod["volumes"].append(
            {"name": mount.volume, "persistentVolumeClaim": {"claimName": mount.claim, "readOnly": mount.read_only}}
        )
        container["volumeMounts"].append({"name": mount.volume, "mountPath": mount.path, "readOnly": mount.read_only})
