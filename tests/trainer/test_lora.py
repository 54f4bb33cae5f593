"""Method LoRA end to end on the tiny pipeline: the adapter files load where people load them,
the merged model is what the adapter does, and a killed run resumes to the same adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing

pytestmark = pytest.mark.trainer

NAME = "tiny-lora"
STEPS, EVERY = 6, 3
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that ignored alpha would be off by a factor of 2


def lora_spec(model: Path, photos: Path, output: Path, *, merge: bool = True) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=2, learningRate=1.0e-2, seed=99)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": RANK, "alpha": ALPHA, "dropout": 0.1, "trainTextEncoder": True}
    spec["checkpoints"] = {"everySteps": EVERY, "keepLast": 2}
    spec["output"]["mergeLoRA"] = merge
    spec["samples"] = {"prompts": ["a photo of sks ball"], "numInferenceSteps": 2}
    return spec


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("lora")
    output = root / "out"
    job = manifest(root / "job.yaml", name=NAME, **lora_spec(tiny_model, photos, output))
    run = run_cli(job, output, root / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def _render(pipe: Any) -> numpy.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of sks ball",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_a_lora_run_writes_both_lora_files_and_the_merged_model(lora_run: Run) -> None:
    out = lora_run.output
    lora_files = {"lora/pytorch_lora_weights.safetensors", f"{NAME}-lora.safetensors"}
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert lora_files <= listed
    assert {f"{NAME}.safetensors", "diffusers/model_index.json", "loss.png"} <= listed  # mergeLoRA: true
    assert lora_files <= {f["path"] for f in lora_run.summary["files"]}
    assert lora_run.summary["samples"] == [str(out / "samples" / "step-000006-0.png")]
    # Checkpoints hold the adapters, not a copy of the frozen base model.
    checkpoint = out / "checkpoints" / "checkpoint-000006"
    for part in ("model.safetensors", "model_1.safetensors"):  # UNet, text encoder
        keys = load_file(str(checkpoint / part)).keys()
        assert keys
        assert all(".lora_A." in k or ".lora_B." in k for k in keys), part
    assert lora_run.events()[-1]["settings"]["optimizer"] == "AdamW"


def test_load_lora_weights_changes_the_base_pipeline_as_the_merged_model_does(lora_run: Run, tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = lora_run.output
    base = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    before = _render(base)
    base.load_lora_weights(out / "lora")
    with_lora = _render(base)
    assert numpy.abs(with_lora - before).max() > 1e-2, "the adapter changed nothing"
    # The file declares no dropout (training-time only), so the loaded model is deterministic.
    assert numpy.array_equal(_render(base), with_lora)

    merged = StableDiffusionPipeline.from_pretrained(out / "diffusers", dtype=torch.float32)
    numpy.testing.assert_allclose(_render(merged), with_lora, atol=2e-3)

    # The web-UI file read through diffusers' own converter for that layout: the same model.
    kohya = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    kohya.load_lora_weights(str(out / f"{NAME}-lora.safetensors"))
    numpy.testing.assert_allclose(_render(kohya), with_lora, atol=2e-3)


def test_the_web_ui_file_is_in_kohya_layout(lora_run: Run) -> None:
    path = lora_run.output / f"{NAME}-lora.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in keys}
        metadata = handle.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert {m.split("_")[0] + "_" + m.split("_")[1] for m in modules} == {"lora_unet", "lora_te"}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    # Every attention projection has its pair and its alpha: the tiny UNet has 4 transformer
    # blocks (down 1, mid 1, up 2) of 2 attentions with 4 projections, its text encoder 2
    # layers of 4.
    assert sum(m.startswith("lora_unet_") for m in modules) == 32
    assert sum(m.startswith("lora_te_") for m in modules) == 8
    for module in modules:
        down, up, alpha = (tensors[f"{module}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == RANK
        assert up.shape[1] == RANK
        assert alpha.shape == ()
        assert float(alpha) == ALPHA
    assert metadata["ss_network_dim"] == str(RANK)
    assert metadata["ss_network_alpha"] == str(ALPHA)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_a_killed_lora_run_resumes_to_the_same_adapter(
    lora_run: Run, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    # The same training, without the merged model: the exports are not part of what resumes.
    job = manifest(tmp_path / "job.yaml", name=NAME, **lora_spec(tiny_model, photos, output, merge=False))
    killed = run_killed_while_checkpointing(job, tmp_path, step=STEPS)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        ".tmp-checkpoint-000006",
        "checkpoint-000003",
    ]

    resumed = run_cli(job, output, tmp_path / "termination-log")
    assert resumed.code == 0, resumed.summary
    training = [e for e in resumed.events() if e["stage"] == "training"]
    assert training[0]["message"] == f"training from step {EVERY} to {STEPS}"

    # LoRA dropout draws from the global RNG, which the checkpoint carries: equal adapters.
    for part in ("model.safetensors", "model_1.safetensors"):
        ours = load_file(str(output / "checkpoints" / "checkpoint-000006" / part))
        theirs = load_file(str(lora_run.output / "checkpoints" / "checkpoint-000006" / part))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{part}: {key}")
    for name in ("lora/pytorch_lora_weights.safetensors", f"{NAME}-lora.safetensors"):
        ours, theirs = load_file(str(output / name)), load_file(str(lora_run.output / name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # No merged model unless mergeLoRA asks for one.
    assert not (output / "diffusers").exists()
    assert not (output / f"{NAME}.safetensors").exists()
    assert not [p for p in output.rglob("*") if p.name.startswith(".tmp-")]
