"""A hand on a running job: save, sample and stop requests reach the trainer in the reply to its
progress report, are acted on at the next step boundary, once, and are reported done; a stopped
run exports the model of the step it stopped at and ends Succeeded, reason StoppedEarly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from finetune_api.report import ExitCode
from tests.trainer.conftest import base_spec, manifest, run_cli
from tests.trainer.operator_stub import Operator

pytestmark = pytest.mark.trainer

TOTAL = 5000  # far more than it takes: the run ends by the stop request


@pytest.fixture
def operator() -> Iterator[Operator]:
    server = Operator()
    yield server
    server.close()


def test_save_sample_and_stop_now(tiny_model: Path, photos: Path, tmp_path: Path, operator: Operator) -> None:
    operator.reply = {"accepted": True, "requests": {"save": "t-1", "sample": "t-2", "stop": "t-3", "dance": "x"}}
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=TOTAL)
    spec["samples"] = {"prompts": ["a photo of sks ball"], "numInferenceSteps": 2}
    run = run_cli(
        manifest(tmp_path / "job.yaml", name="hand", **spec),
        output,
        tmp_path / "termination-log",
        FINETUNE_REPORT_URL=operator.url,
        FINETUNE_REPORT_TOKEN="tok",
        FINETUNE_ATTEMPT="hand-pod-0",
    )
    assert run.code == ExitCode.SUCCESS, run.summary
    assert run.summary["reason"] == "StoppedEarly"
    step = run.summary["step"]
    assert 0 < step < TOTAL
    assert run.summary["message"].startswith(f"trained {step} steps of {TOTAL}, stopped as asked")
    # Each request once, at the step it stopped at, and said so on every report after.
    messages = [e.get("message", "") for e in run.events()]
    for said in (f"checkpoint at step {step} of {TOTAL} saved, as asked",
                 f"samples rendered at step {step} of {TOTAL}, as asked",
                 f"stopping at step {step} of {TOTAL}, as asked: exporting the model of step {step}"):  # fmt: skip
        assert messages.count(said) == 1, (said, messages)
    reports = [body for body, _ in operator.received]
    assert reports[-1]["done"] == {"save": "t-1", "sample": "t-2", "stop": "t-3"}
    assert not any("dance" in r.get("done", {}) for r in reports)
    # A checkpoint and samples at that step, none at any other; the export is that step's model.
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [f"checkpoint-{step:06d}"]
    assert sorted(p.name for p in (output / "samples").glob("*.png")) == [f"step-{step:06d}-0.png"]
    pipe = StableDiffusionPipeline.from_pretrained(output / "diffusers", dtype=torch.float32)
    assert pipe.unet is not None
    assert (output / "manifest.json").is_file()
