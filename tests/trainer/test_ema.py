"""EMA weights (spec.training.ema): the exported average equals one the test computes from the
checkpointed weights, with diffusers' ramp as documented; every checkpoint holds the average,
a killed LoRA run resumes to the same averaged adapter, and samples show both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing

pytestmark = pytest.mark.trainer

STEPS = 4
UNET = "diffusers/unet/diffusion_pytorch_model.safetensors"


def _run(tmp_path: Path, name: str, spec: dict[str, Any]) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    run = run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def _checkpointed_weights(output: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"checkpoint-{step:06d}" / "model.safetensors"))


def _decay(n: int, *, decay: float, warmup: bool) -> float:
    """The decay of update n (from 0), as diffusers' EMAModel documents it."""
    if n == 0:
        return 0.0
    ramp = 1 - (1 + n) ** -0.75 if warmup else (1 + n) / (10 + n)
    return min(decay, ramp)


@pytest.mark.parametrize(
    "ema",
    [
        {"decay": 0.6},  # warm-up, every step, exported
        {"decay": 0.95, "warmup": False, "everySteps": 2, "startStep": 1, "export": False},
    ],
    ids=["warmup-every-step", "plain-ramp-every-2-from-1-not-exported"],
)
def test_the_exported_average_is_the_average_of_the_checkpointed_weights(
    tiny_model: Path, photos: Path, tmp_path: Path, ema: dict[str, Any]
) -> None:
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=STEPS, learningRate=5.0e-3)
    spec["training"]["ema"] = ema
    spec["checkpoints"] = {"everySteps": 1, "keepLast": STEPS}
    spec["samples"] = {"prompts": ["a photo of sks ball"], "numInferenceSteps": 2, "everySteps": 2}
    run = _run(tmp_path, "ema", spec)

    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    every, start = ema.get("everySteps", 1), ema.get("startStep", 0)
    updates = [s for s in range(1, STEPS + 1) if s >= start and (s - start) % every == 0]
    average = {k: v.clone().float() for k, v in base.items()}
    for n, step in enumerate(updates):
        d = _decay(n, decay=ema["decay"], warmup=ema.get("warmup", True))
        weights = _checkpointed_weights(output, step)
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
    last = _checkpointed_weights(output, STEPS)
    assert any(not torch.allclose(average[k], last[k], atol=1e-5) for k in last), "an average that is the last step"

    exported = load_file(str(output / UNET))
    assert exported.keys() == average.keys()
    expected = average if ema.get("export", True) else last
    for key in exported:
        torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # Every checkpoint holds the average beside the weights (accelerate's custom state).
    state = torch.load(output / "checkpoints" / f"checkpoint-{STEPS:06d}" / "custom_checkpoint_0.pkl")
    assert state["optimization_step"] == len(updates)
    names = list(dict(_unet_parameters(tiny_model)).keys())
    for name, shadow in zip(names, state["shadow_params"], strict=True):
        torch.testing.assert_close(shadow, average[name], rtol=0, atol=1e-6, msg=name)

    # Samples of both: the trained weights' and the average's, each with its contact sheet.
    for sample in ("samples/step-000004-0.png", "samples/ema/step-000004-0.png", "samples-ema.png", "samples.png"):
        with Image.open(output / sample) as image:
            assert image.size[0] >= 64, sample
    trained = numpy.asarray(Image.open(output / "samples/step-000004-0.png"), dtype=numpy.float32)
    averaged = numpy.asarray(Image.open(output / "samples/ema/step-000004-0.png"), dtype=numpy.float32)
    assert numpy.abs(trained - averaged).max() > 0, "the average's sample is the trained weights' sample"
    card = (output / "README.md").read_text()
    assert "| EMA | decay " in card
    assert ("this model is the average" in card) == ema.get("export", True)
    assert run.summary["step"] == STEPS


def _unet_parameters(model: Path) -> list[tuple[str, torch.nn.Parameter]]:
    from diffusers import UNet2DConditionModel

    return list(UNet2DConditionModel.from_pretrained(model / "unet").named_parameters())


def _lora_spec(model: Path, photos: Path, output: Path) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=6, batchSize=2, learningRate=1.0e-2, seed=7)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": 4, "alpha": 4}
    spec["training"]["ema"] = {"decay": 0.7, "onCPU": True}
    spec["checkpoints"] = {"everySteps": 3, "keepLast": 2}
    return spec


def test_a_killed_lora_run_resumes_to_the_same_averaged_adapter(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    straight = _run(tmp_path, "straight", _lora_spec(tiny_model, photos, tmp_path / "straight"))
    output = tmp_path / "killed"
    job = manifest(tmp_path / "killed.yaml", name="straight", **_lora_spec(tiny_model, photos, output))
    killed = run_killed_while_checkpointing(job, tmp_path, step=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(job, output, tmp_path / "resumed-log")
    assert resumed.code == ExitCode.SUCCESS, resumed.summary
    assert "training from step 3 to 6" in {e.get("message") for e in resumed.events()}
    for name in ("lora/pytorch_lora_weights.safetensors", "straight-lora.safetensors"):
        ours, theirs = load_file(str(output / name)), load_file(str(straight.output / name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    # The average, not the last step's adapter: the checkpoint's up-projections (lora_B) weigh
    # something else than the exported ones (alpha = rank: exported as they are).
    exported = load_file(str(output / "lora/pytorch_lora_weights.safetensors"))
    raw = _checkpointed_weights(output, 6)
    raw_b = [v for k, v in raw.items() if "lora_B" in k]
    exported_b = [v for k, v in exported.items() if "lora_B" in k or "lora.up" in k]
    assert raw_b and len(raw_b) == len(exported_b)
    total = float(sum(v.double().abs().sum() for v in raw_b))
    assert abs(total - float(sum(v.double().abs().sum() for v in exported_b))) > 1e-6 * total


def test_a_start_after_the_last_step_is_refused(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    spec = base_spec(tiny_model, photos, tmp_path / "out")
    del spec["training"]["maxSteps"]
    spec["training"]["stepsPerImage"] = 1  # 4 photos: 4 steps, known only to the trainer
    spec["training"]["ema"] = {"startStep": 5}
    output = tmp_path / "out"
    run = run_cli(manifest(tmp_path / "late.yaml", name="late", **spec), output, tmp_path / "late-log")
    assert run.code == ExitCode.BAD_INPUT
    assert run.summary["message"].startswith("spec.training.ema.startStep is after the run's last step")
    assert run.summary["message"].endswith("(this run has 4)")


def test_the_average_on_the_gpu_is_in_the_memory_estimate() -> None:
    from finetune_api.v1alpha1 import parse_manifest
    from finetune_trainer.families import sdxl

    def estimate(ema: dict[str, Any] | None) -> float:
        spec = {
            "baseModel": {"uri": "hf://stabilityai/stable-diffusion-xl-base-1.0", "type": "sdxl"},
            "dataset": {"instanceImages": "pvc://d/x", "instancePrompt": "a photo of sks"},
            "training": {"maxSteps": 10, **({"ema": ema} if ema is not None else {})},
            "output": {"uri": "pvc://o/x"},
        }
        job = parse_manifest({"metadata": {"name": "m"}, "spec": spec})
        found = sdxl.SDXL.memory_needed(job.spec, mixed_precision="bf16", optimizer="AdamW8bit")
        return found.bytes

    without = estimate(None)
    assert estimate({}) == pytest.approx(without + 4 * sdxl.UNET_PARAMS)
    assert estimate({"onCPU": True}) == pytest.approx(without)
