"""The layout: one order of a Job's fields, whichever builder added them and when."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from finetune_api import parse_manifest
from finetune_operator.render import render
from finetune_operator.render.failure_policy import add_failure_policy
from finetune_operator.render.job_file import add_job_file
from finetune_operator.render.kueue import queue_in_kueue
from finetune_operator.render.layout import arrange
from finetune_operator.render.placement import place_pod
from finetune_operator.render.report_channel import add_report_channel
from finetune_operator.render.security import mount_credentials, restrict_pod
from finetune_operator.render.storage import claim_mounts, mount_claims
from finetune_operator.render.trainer import pod_spec, trainer_container, trainer_job
from tests.bad_specs import good_manifest


def _manifest() -> dict[str, Any]:
    manifest = good_manifest()
    manifest["metadata"] = {"name": "nick", "namespace": "team-a", "uid": "u-1"}
    spec = manifest["spec"]
    spec["baseModel"]["credentialsSecret"] = "hf-token"
    spec["resources"] = {"nodeSelector": {"pool": "a100"}, "affinity": {"nodeAffinity": {}}, "priorityClassName": "p"}
    spec["runPolicy"] = {"queueName": "gpu", "priorityClass": "high", "activeDeadlineSeconds": 60}
    return manifest


@pytest.mark.parametrize("seed", range(5))
def test_the_builders_in_any_order_write_the_job_render_writes(seed: int) -> None:
    body = _manifest()
    parsed = parse_manifest(body)
    spec = parsed.spec
    options = {"trainer_image": "t:1", "report_base_url": "https://op:8443", "report_ca": "CA"}
    expected = render(body, parsed, **options).job

    builders: list[Callable[[dict[str, Any]], None]] = [
        lambda job: add_job_file(job, parsed, namespace="team-a", name="nick", uid="u-1"),
        lambda job: add_report_channel(
            job, namespace="team-a", name="nick", base_url="https://op:8443", audience="finetune-operator", ca="CA"
        ),
        lambda job: mount_credentials(job, spec.base_model.credentials_secret),
        lambda job: mount_claims(job, claim_mounts(parsed)),
        lambda job: place_pod(job, spec.resources),
        lambda job: add_failure_policy(job, spec.run_policy),
        lambda job: restrict_pod(job, trainer_uid=1000),
        lambda job: queue_in_kueue(job, spec.run_policy),
    ]
    random.Random(seed).shuffle(builders)
    job = trainer_job(
        name="nick", namespace="team-a", uid="u-1", image="t:1", image_pull_policy="IfNotPresent", shm_size="8Gi"
    )
    for build in builders:
        build(job)
    arrange(job)
    # json.dumps keeps the order of keys and of lists: equal text is the same Job, written alike.
    assert json.dumps(job) == json.dumps(expected)


def test_what_the_layout_does_not_name_keeps_its_place_after_what_it_does(job: dict[str, Any]) -> None:
    container = trainer_container(job)
    container["env"].insert(0, {"name": "EXTRA_B", "value": "b"})
    container["env"].insert(0, {"name": "EXTRA_A", "value": "a"})
    container["workingDir"] = "/work"
    pod_spec(job)["hostname"] = "h"
    arrange(job)
    arranged = trainer_container(job)
    assert [e["name"] for e in arranged["env"]][-2:] == ["EXTRA_A", "EXTRA_B"]
    assert list(arranged)[-1] == "workingDir"
    assert list(pod_spec(job))[-1] == "hostname"
    assert list(job["spec"]) == ["completions", "parallelism", "template"]
