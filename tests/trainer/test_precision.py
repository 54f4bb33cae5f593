"""Full precision where asked: with halfPrecision false, a run in bf16 exports fp32 weights
that never went through bf16 (the frozen parts are the base model's, bit for bit), and a LoRA
is merged into the base in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import Run, base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A part's tensors by name (a text encoder's without the ``text_model.`` that exports add
    for earlier transformers versions)."""
    (path,) = sorted((folder / part).glob("*.safetensors"))
    return {k.removeprefix("text_model."): v for k, v in load_file(str(path)).items()}


def _run(tmp_path: Path, name: str, spec: dict[str, Any]) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    run = run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    assert run.summary["settings"]["mixed_precision"] == "bf16"
    return run


def test_an_fp32_export_of_a_bf16_run_is_the_base_plus_what_training_changed(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    spec = base_spec(tiny_model, photos, tmp_path / "out", maxSteps=2, mixedPrecision="bf16")
    run = _run(tmp_path, "db", spec)
    exported = run.output / "diffusers"
    for part in ("vae", "text_encoder"):  # frozen: exactly the base model's fp32 weights
        ours, base = _weights(exported, part), _weights(tiny_model, part)
        assert ours.keys() == base.keys()
        for key in ours:
            assert ours[key].dtype == torch.float32
            assert torch.equal(ours[key], base[key]), f"{part}.{key} went through bf16"
    # The UNet: the fp32 master weights training left, as the final checkpoint holds them.
    trained = load_file(str(run.output / "checkpoints" / "checkpoint-000002" / "model.safetensors"))
    unet = _weights(exported, "unet")
    assert all(torch.equal(unet[k], trained[k]) for k in trained)


def test_a_lora_merged_at_fp32_is_the_base_plus_the_adapters_delta(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    rank, alpha = 4, 8.0
    spec = base_spec(tiny_model, photos, tmp_path / "out", maxSteps=3, mixedPrecision="bf16", learningRate=1e-2)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": rank, "alpha": alpha}
    spec["output"]["mergeLoRA"] = True
    run = _run(tmp_path, "lora", spec)

    adapters = load_file(str(run.output / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(v.dtype == torch.float32 for v in adapters.values())
    base, merged = _weights(tiny_model, "unet"), _weights(run.output / "diffusers", "unet")
    expected = dict(base)
    for key, down in adapters.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("unet.").split(".lora_A.")[0]
        up = adapters[key.replace(".lora_A.", ".lora_B.")]
        delta = up.flatten(1) @ down.flatten(1) * (alpha / rank)
        weight = f"{module}.weight"
        expected[weight] = base[weight] + delta.reshape(base[weight].shape)
    changed = [k for k in base if not torch.equal(expected[k], base[k])]
    assert len(changed) >= 40  # every adapted layer moved
    for key in base:
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    for part in ("vae", "text_encoder"):
        ours, theirs = _weights(run.output / "diffusers", part), _weights(tiny_model, part)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
