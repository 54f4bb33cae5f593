"""The job file: the FineTuneJob the trainer reads at ``/etc/finetune/job.yaml``, its pvc:// URIs
replaced by the paths where the pod mounts them.

It travels in a pod-template annotation that a downwardAPI volume turns into the file, so the
Job is the only object created: no ConfigMap to create first, to own or to clean up.
"""

from __future__ import annotations

import json
from typing import Any

from finetune_api.contract import ANNOTATION_JOB_FILE, JOB_FILE_DIR
from finetune_api.v1alpha1 import API_VERSION, KIND, FineTuneJob, dump_spec
from finetune_operator.render.storage import resolve_uri
from finetune_operator.render.trainer import Manifest, pod_spec, trainer_container

JOB_FILE_VOLUME = "job"


def resolved_manifest(job: FineTuneJob, *, namespace: str, name: str, uid: str) -> dict[str, Any]:
    """The job file the trainer reads: the same FineTuneJob, pvc:// URIs replaced by mount paths."""
    resolved = job.model_copy(deep=True)
    spec = resolved.spec
    spec.base_model.uri = resolve_uri(spec.base_model.uri) or spec.base_model.uri
    spec.base_model.vae_uri = resolve_uri(spec.base_model.vae_uri)
    spec.base_model.components_uri = resolve_uri(spec.base_model.components_uri)
    spec.dataset.instance_images = resolve_uri(spec.dataset.instance_images) or spec.dataset.instance_images
    spec.dataset.class_images = resolve_uri(spec.dataset.class_images)
    for concept in spec.dataset.concepts or ():
        concept.images = resolve_uri(concept.images) or concept.images
        concept.class_images = resolve_uri(concept.class_images)
    spec.output.uri = resolve_uri(spec.output.uri) or spec.output.uri
    if spec.evaluation is not None:
        spec.evaluation.clip_model = resolve_uri(spec.evaluation.clip_model)
        spec.evaluation.dino_model = resolve_uri(spec.evaluation.dino_model)
    body = dump_spec(resolved)
    body.pop("status", None)
    body["apiVersion"] = API_VERSION
    body["kind"] = KIND
    body["metadata"] = {"name": name, "namespace": namespace, "uid": uid}
    return body


def add_job_file(job: Manifest, finetune_job: FineTuneJob, *, namespace: str, name: str, uid: str) -> None:
    # JSON is YAML too, and renders ten times faster: this runs once per new FineTuneJob.
    text = json.dumps(resolved_manifest(finetune_job, namespace=namespace, name=name, uid=uid), indent=1)
    job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_JOB_FILE] = text
    pod_spec(job)["volumes"].append(
        {
            "name": JOB_FILE_VOLUME,
            "downwardAPI": {
                "items": [
                    {"path": "job.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_JOB_FILE}']"}}
                ]
            },
        }
    )
    trainer_container(job)["volumeMounts"].append(
        {"name": JOB_FILE_VOLUME, "mountPath": JOB_FILE_DIR, "readOnly": True}
    )
