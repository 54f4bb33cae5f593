"""render() against the Jobs it is known to write, compared as parsed objects.

Each case is a spec (every example, and the variants the behaviour tests use) with the operator's
settings; its fixture in golden/ is the Job and the claim mounts rendered, as JSON with sorted
keys and the named lists whose order means nothing (env, volumes, volumeMounts) sorted by name.
A change that adds, removes or changes anything in a Job shows here as a diff, which is the
point: the Job is what users' pods, Kueue and kubectl see.

To accept an intended change: FINETUNE_WRITE_GOLDEN=1 python -m pytest tests/unit/render/test_golden.py,
then read the diff of golden/ before committing it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api import parse_manifest
from finetune_api.contract import ANNOTATION_OPERATOR_VERSION
from finetune_operator.render import render
from tests.bad_specs import good_manifest

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).resolve().parent / "golden"
# The operator's version is stamped on every Job; a release must not look like a change in shape.
VERSION = "<operator-version>"
SETTINGS = {"trainer_image": "trainer:1", "report_base_url": "http://op.svc:8081"}
CA = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"


@dataclass(frozen=True)
class Case:
    id: str
    manifest: Callable[[], dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    name: str = "nick-portrait"
    namespace: str = "team-a"


def example(file: str) -> Callable[[], dict[str, Any]]:
    def manifest() -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load((ROOT / "examples" / file).read_text())
        return loaded

    return manifest


def good(change: Callable[[dict[str, Any]], None] | None = None) -> Callable[[], dict[str, Any]]:
    def manifest() -> dict[str, Any]:
        built = good_manifest()
        if change is not None:
            change(built["spec"])
        return built

    return manifest


def _flux_parts_on_claims(spec: dict[str, Any]) -> None:
    spec["method"] = "LoRA"
    spec["baseModel"] = {
        "uri": "pvc://models/flux1-dev.safetensors",
        "type": "flux1",
        "componentsUri": "pvc://flux-parts/FLUX.1-dev",
        "vaeUri": "pvc://vaes/ae",
    }


def _one_claim_in_and_out(spec: dict[str, Any]) -> None:
    spec["dataset"]["instanceImages"] = "pvc://shared/images"
    spec["output"]["uri"] = "pvc://shared/out"


def _class_images_on_a_claim(spec: dict[str, Any]) -> None:
    spec["dataset"].update(
        classPrompt="a photo of a man",
        classImages="pvc://class-images/men/",
        priorPreservation=True,
    )


def _object_store(spec: dict[str, Any]) -> None:
    spec["baseModel"] = {"uri": "s3://models/sd15/", "type": "v1x", "credentialsSecret": "s3-keys"}
    spec["dataset"]["instanceImages"] = "s3://datasets/nick/"
    spec["dataset"].update(classPrompt="a photo of a man", classImages="gs://class-images/men/", priorPreservation=True)
    spec["output"]["uri"] = "s3://outputs/nick/"


def _workstation_paths(spec: dict[str, Any]) -> None:
    # What `finetune-trainer run` takes on a workstation; the CRD refuses it, an older CRD did not.
    spec["baseModel"]["uri"] = "/models/sd15"
    spec["dataset"]["instanceImages"] = "file:///photos/nick"
    spec["output"]["uri"] = "file:///outputs/nick"


def _run_policy(spec: dict[str, Any]) -> None:
    spec["runPolicy"] = {
        "backoffLimit": 5,
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
        "suspend": True,
    }


def _queued(spec: dict[str, Any]) -> None:
    spec["runPolicy"] = {"queueName": "gpu-queue"}


def _queued_with_priority(spec: dict[str, Any]) -> None:
    spec["runPolicy"] = {"queueName": "gpu-queue", "priorityClass": "high", "suspend": True}


def _placement(spec: dict[str, Any]) -> None:
    spec["resources"] = {
        "gpus": 2,
        "gpuResource": "amd.com/gpu",
        "nodeSelector": {"pool": "a100"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
            {"key": "nvidia.com/gpu", "operator": "Exists"},
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]
                }
            }
        },
        "priorityClassName": "training",
        "shmSize": "16Gi",
        "cpu": "8",
        "memory": "64Gi",
    }


def _own_image(spec: dict[str, Any]) -> None:
    spec["image"] = "registry.example/trainer:custom"


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists"}
CASES = [
    *(
        Case(f"example-{path.stem}", example(path.name), name=path.stem)
        for path in sorted((ROOT / "examples").glob("*.yaml"))
    ),
    Case("portrait-no-report-url", example("portrait.yaml"), settings={"report_base_url": ""}),
    Case("portrait-default-tolerations", example("portrait.yaml"), settings={"default_tolerations": [GPU_TOLERATION]}),
    Case("portrait-report-ca", example("portrait.yaml"), settings={"report_ca": CA}),
    Case(
        "portrait-operator-settings",
        example("portrait.yaml"),
        settings={
            "trainer_image": "registry.example/finetune-trainer:2",
            "gpu_resource": "amd.com/gpu",
            "report_base_url": "https://finetune-operator.finetune-system.svc:8443/",
            "report_audience": "other-audience",
            "image_pull_policy": "Always",
            "trainer_uid": 2000,
            "report_ca": CA,
        },
    ),
    Case("good", good()),
    Case("good-flux-parts-on-claims", good(_flux_parts_on_claims)),
    Case("good-one-claim-in-and-out", good(_one_claim_in_and_out)),
    Case("good-class-images-on-a-claim", good(_class_images_on_a_claim)),
    Case("good-object-store-with-credentials", good(_object_store), settings={"report_ca": CA}),
    Case("good-workstation-paths", good(_workstation_paths)),
    Case("good-run-policy", good(_run_policy)),
    Case("good-kueue-queue", good(_queued)),
    Case("good-kueue-queue-priority-suspended", good(_queued_with_priority)),
    Case("good-placement", good(_placement), settings={"default_tolerations": [GPU_TOLERATION]}),
    Case("good-placement-settings-gpu-resource", good(_placement), settings={"gpu_resource": "intel.com/gpu"}),
    Case("good-own-image", good(_own_image)),
    Case("good-long-name", good(), name="a" * 252 + "b", namespace="a-namespace-of-some-length"),
]


def by_name(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with its env, volumes and volume mounts sorted by name, in place."""
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = sorted(pod["volumes"], key=lambda item: item["name"])
    for container in pod["containers"]:
        for key in ("env", "volumeMounts"):
            container[key] = sorted(container[key], key=lambda item: (item["name"], item.get("mountPath", "")))
    return job


def golden_of(case: Case) -> dict[str, Any]:
    body = case.manifest()
    body["metadata"] = {"name": case.name, "namespace": case.namespace, "uid": "1234-uid"}
    job = parse_manifest(copy.deepcopy(body))
    rendered = render(body, job, **{**SETTINGS, **case.settings})
    out = copy.deepcopy(rendered.job)
    annotations = out["metadata"]["annotations"]
    assert annotations[ANNOTATION_OPERATOR_VERSION]
    annotations[ANNOTATION_OPERATOR_VERSION] = VERSION
    return {"job": by_name(out), "mounts": [asdict(m) for m in rendered.mounts]}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_render_writes_the_golden_job_of_each_case(case: Case) -> None:
    path = GOLDEN / f"{case.id}.json"
    job = golden_of(case)
    if os.environ.get("FINETUNE_WRITE_GOLDEN"):
        path.write_text(json.dumps(job, indent=1, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == job


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_no_env_value_refers_to_another_so_their_order_means_nothing(case: Case) -> None:
    for container in golden_of(case)["job"]["spec"]["template"]["spec"]["containers"]:
        assert not [e for e in container["env"] if "$(" in e.get("value", "")]


def test_every_fixture_has_its_case() -> None:
    """A fixture without a case would silently stop being checked."""
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(case.id for case in CASES)
