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
    # kohya's set: the tiny UNet has 4 transformer blocks (down 1, mid 1, up 2), each with 2
    # attentions of 4 projections, a feed-forward of 2 layers, proj_in and proj_out (12); its
    # text encoder 2 layers of 4 attention projections and an MLP of 2 (6).
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in modules
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2" in modules
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in modules
    assert sum(m.startswith("lora_unet_") for m in modules) == 4 * 12
    assert sum(m.startswith("lora_te_") for m in modules) == 2 * 6
    for module in modules:
        down, up, alpha = (tensors[f"{module}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == RANK
        assert up.shape[1] == RANK
        assert alpha.shape == ()
        assert float(alpha) == ALPHA
    assert metadata["ss_network_dim"] == str(RANK)
    assert metadata["ss_network_alpha"] == str(ALPHA)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def denoising_loss(unet: Any, pipeline_dir: Path, photos: Path) -> float:
    """The UNet's noise-prediction error on the photos, at fixed noise and timesteps."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from finetune_trainer import data

    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
    examples = data.load_folder(photos, prompt="a photo of sks ball", resolution=64, field_name="x").examples
    pixels = torch.stack([data.crop_and_flip(e.pixels, 64, center=True, flip=False) for e in examples])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer(["a photo of sks ball"] * len(examples), padding="max_length", return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(examples),), generator=gen)
            prediction = unet(scheduler.add_noise(latents, noise, steps), steps, hidden).sample
            total += float(torch.nn.functional.mse_loss(prediction, noise))
    return total / 8


def test_lora_learns_at_its_default_rate_and_the_resource_shows_it(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    def train(name: str, **extra: Any) -> tuple[Run, float]:
        output = tmp_path / name
        spec = base_spec(tiny_model, photos, output, maxSteps=12, seed=5)
        del spec["training"]["learningRate"]
        spec["training"].update(extra)
        spec["method"] = "LoRA"
        spec["training"]["lora"] = {"rank": 4, "alpha": 4}
        run = run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")
        assert run.code == ExitCode.SUCCESS, run.summary
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
        pipe.load_lora_weights(output / "lora")
        return run, denoising_loss(pipe.unet, tiny_model, photos)

    before = denoising_loss(
        StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32).unet, tiny_model, photos
    )
    unset, unset_loss = train("unset")
    _, explicit_loss = train("explicit", learningRate=1.0e-4)
    dreambooth_rate, dreambooth_rate_loss = train("low", learningRate=2.0e-6)

    assert unset.summary["settings"]["learning_rate"] == "0.0001"
    assert explicit_loss == pytest.approx(unset_loss, rel=1e-6)
    # Measured here: 1.1133 before, 1.1072 at the default, 1.1132 at 2e-6.
    assert before - unset_loss > 0.003, (before, unset_loss)
    assert before - unset_loss > 20 * max(before - dreambooth_rate_loss, 1e-9), (before, dreambooth_rate_loss)
    # The rate DreamBooth uses is named as too low for an adapter, on the resource.
    assert any("learningRate: 2e-06 is low for LoRA" in w for w in dreambooth_rate.summary["warnings"])
    assert not any("is low for LoRA" in w for w in unset.summary["warnings"])


def test_attention_only_targets_are_an_option_and_load_in_diffusers(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "out"
    spec = lora_spec(tiny_model, photos, output, merge=False)
    spec["training"].update(maxSteps=2)
    spec["training"]["lora"]["targets"] = "attention"
    spec["checkpoints"] = {}
    run = run_cli(manifest(tmp_path / "job.yaml", name=NAME, **spec), output, tmp_path / "log")
    assert run.code == ExitCode.SUCCESS, run.summary
    modules = {k.rsplit(".", 1)[0] for k in load_file(str(output / f"{NAME}-lora.safetensors")) if k.endswith(".alpha")}
    assert sum(m.startswith("lora_unet_") for m in modules) == 4 * 8
    assert sum(m.startswith("lora_te_") for m in modules) == 2 * 4
    assert not [m for m in modules if "ff_net" in m or "proj_in" in m or "mlp" in m]
    base = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    before = _render(base)
    base.load_lora_weights(output / "lora")
    peft = _render(base)
    kohya = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    kohya.load_lora_weights(str(output / f"{NAME}-lora.safetensors"))
    assert numpy.abs(peft - before).max() > 1e-3
    numpy.testing.assert_allclose(_render(kohya), peft, atol=2e-3)


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
