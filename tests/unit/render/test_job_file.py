"""The job file: the resolved FineTuneJob, from a pod-template annotation to /etc/finetune/job.yaml."""

from __future__ import annotations

import json
from typing import Any

from finetune_api import parse_manifest
from finetune_api.contract import ANNOTATION_JOB_FILE, trainer_command
from finetune_operator.render.job_file import add_job_file, resolved_manifest
from finetune_operator.render.trainer import pod_spec, trainer_container
from tests.unit.render.specs import parsed, with_fields


def test_the_trainer_command_reads_the_file_the_annotation_becomes(job: dict[str, Any]) -> None:
    add_job_file(job, parsed(), namespace="team-a", name="nick-portrait", uid="1234-uid")
    text = job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_JOB_FILE]
    [volume] = [v for v in pod_spec(job)["volumes"] if "downwardAPI" in v]
    [item] = volume["downwardAPI"]["items"]
    assert item["fieldRef"]["fieldPath"] == f"metadata.annotations['{ANNOTATION_JOB_FILE}']"
    [mount] = [m for m in trainer_container(job)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert f"{mount['mountPath']}/{item['path']}" == trainer_command()[-1]
    # The trainer validates the file with the same models.
    resolved = parse_manifest(json.loads(text))
    assert resolved.spec.output.uri == "/data/outputs/nick/"


def test_pvc_uris_become_mount_paths_and_other_uris_stay() -> None:
    job = parsed(with_fields("dataset", classPrompt="a man", classImages="pvc://class/men/", priorPreservation=True))
    job.spec.base_model.uri = "hf://stabilityai/stable-diffusion-2-base"
    body = resolved_manifest(job, namespace="team-a", name="nick", uid="u-1")
    assert body["apiVersion"] == "finetune.dev/v1alpha1"
    assert body["kind"] == "FineTuneJob"
    assert body["metadata"] == {"name": "nick", "namespace": "team-a", "uid": "u-1"}
    assert "status" not in body
    assert body["spec"]["baseModel"]["uri"] == "hf://stabilityai/stable-diffusion-2-base"
    assert body["spec"]["dataset"]["instanceImages"] == "/data/datasets/nick/"
    assert body["spec"]["dataset"]["classImages"] == "/data/class/men/"
    assert body["spec"]["output"]["uri"] == "/data/outputs/nick/"
    # The parsed spec itself is left as it was: the status shows the user's URIs.
    assert job.spec.dataset.class_images == "pvc://class/men/"
