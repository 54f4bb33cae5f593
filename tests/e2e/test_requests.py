"""A hand on a running job: `kubectl ftj save|sample|stop` (request annotations) reach the real
trainer through the operator's reply to its progress reports; each is acted on at a step
boundary, its annotation is removed and an Event says what was done; a stopped job ends
Succeeded with reason StoppedEarly and a loadable export; only who may patch the job can ask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_api.contract import REQUEST_ANNOTATIONS
from tests.jobs import job_manifest, prepare_claims
from tests.kube import Kube, OperatorProcess, wait_for

pytestmark = pytest.mark.e2e

NAME = "handed"
TOTAL = 200000  # far more than it takes: the run ends by the stop request


def _ftj(kube: Kube, namespace: str, *request: str) -> str:
    """``kubectl ftj <request> NAME -n NAMESPACE``, as a person types it."""
    result = subprocess.run(
        [sys.executable, "-m", "finetune_operator.kubectl_plugin",
         f"--kubeconfig={kube.cluster.kubeconfig}", *request, NAME, "-n", namespace],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _settled(kube: Kube, namespace: str, kind: str) -> dict[str, Any]:
    """The job once the request's annotation is gone (the operator saw it done)."""

    def gone() -> dict[str, Any] | None:
        body = kube.ftj(namespace, NAME)
        annotations = body["metadata"].get("annotations") or {}
        return body if REQUEST_ANNOTATIONS[kind] not in annotations else None

    return wait_for(gone, timeout=120, what=f"{REQUEST_ANNOTATIONS[kind]} removed")


def _events(kube: Kube, namespace: str) -> dict[str, str]:
    listed = kube.kubectl("-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={NAME}",
                          "-o", "jsonpath={range .items[*]}{.reason}={.message}{'\\n'}{end}")  # fmt: skip
    return dict(line.split("=", 1) for line in listed.splitlines() if "=" in line)


def test_save_sample_and_stop_a_running_job(
    kube: Kube, namespace: str, operator: OperatorProcess, tiny_assets: Path
) -> None:
    paths = prepare_claims(kube, namespace, tiny_assets)
    manifest = job_manifest(NAME, training={"maxSteps": TOTAL}, checkpoints={"everySteps": 0, "keepLast": 3},
                            samples={"everySteps": 0})  # fmt: skip
    kube.create_ftj(namespace, manifest)
    kube.wait_status(namespace, NAME, lambda s: (s.get("progress") or {}).get("step", 0) >= 1, timeout=300,
                     what="training")  # fmt: skip

    # Someone who may read the job but not patch it cannot ask anything of it.
    kube.kubectl("-n", namespace, "create", "role", "reader", "--verb=get,list,watch",
                 "--resource=finetunejobs.finetune.dev")  # fmt: skip
    kube.kubectl("-n", namespace, "create", "rolebinding", "reader", "--role=reader", "--user=reader")
    refused = kube.kubectl("-n", namespace, "annotate", "ftj", NAME, "--as=reader",
                           f"{REQUEST_ANNOTATIONS['stop']}=now", check=False)  # fmt: skip
    assert "forbidden" in refused.lower() and "patch" in refused, refused

    assert "acts at its next step" in _ftj(kube, namespace, "save")
    saved = _settled(kube, namespace, "save")
    checkpoints = (
        saved["status"].get("checkpoints")
        or kube.wait_status(namespace, NAME, lambda s: s.get("checkpoints"), what="the checkpoint on the status")[
            "checkpoints"
        ]
    )
    assert len(checkpoints) == 1 and 0 < checkpoints[0]["step"] < TOTAL
    assert (paths["outputs"] / NAME / "checkpoints" / f"checkpoint-{checkpoints[0]['step']:06d}").is_dir()

    _ftj(kube, namespace, "sample")
    _settled(kube, namespace, "sample")
    assert list((paths["outputs"] / NAME / "samples").glob("step-*-0.png"))

    _ftj(kube, namespace, "stop")
    status = kube.wait_phase(namespace, NAME, "Succeeded", "Failed", timeout=300)
    assert (status["phase"], status["reason"]) == ("Succeeded", "StoppedEarly"), status
    step = status["progress"]["step"]
    assert checkpoints[0]["step"] <= step < TOTAL and status["progress"]["totalSteps"] == TOTAL
    assert "diffusers/model_index.json" in {f["path"] for f in status["output"]["files"]}
    _settled(kube, namespace, "stop")
    events = _events(kube, namespace)
    assert "as finetune.dev/save-now=" in events.get("SavedOnRequest", ""), events
    assert "as finetune.dev/sample-now=" in events.get("SampledOnRequest", ""), events
    assert f"at step {step}, as finetune.dev/stop-now=" in events.get("StoppedEarly", ""), events
    printed = kube.kubectl("-n", namespace, "get", "ftj", NAME).splitlines()[1]
    assert "Succeeded" in printed and f"{step}/{TOTAL}" in printed

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(paths["outputs"] / NAME / "diffusers", dtype=torch.float32)
    assert pipe.unet is not None
