"""SDXL on a tiny random SDXL pipeline the tests build: LoRA and DreamBooth learn, the single
file and the kohya-layout LoRA load through diffusers' own loaders and agree with the folder and
the diffusers-layout LoRA, a killed run resumes to the same weights, and the size-and-crop time
ids come from each image's true size and crop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer.report import ProgressReporter
from finetune_trainer.train import DreamBoothRecipe
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing

pytestmark = pytest.mark.trainer

PROMPT = "a photo of sks ball"


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl") / "model", seed=0)


def xl_spec(model: Path, photos: Path, output: Path, *, method: str = "LoRA", **training: Any) -> dict[str, Any]:
    spec = base_spec(model, photos, output, **training)
    spec["baseModel"]["type"] = "sdxl"
    spec["method"] = method
    if method == "LoRA":
        spec["training"].setdefault("lora", {"rank": 4, "alpha": 4, "trainTextEncoder": True})
    return spec


def _run(tmp_path: Path, name: str, spec: dict[str, Any]) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    run = run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def denoising_loss(pipe: Any, photos: Path) -> float:
    """The epsilon loss of the pipeline's UNet on the photos, at fixed noise and timesteps,
    conditioned as SDXL is (both encoders, the pooled embedding, the images' time ids)."""
    from diffusers import DDPMScheduler

    from finetune_trainer import data

    examples = data.load_folder(photos, prompt=PROMPT, resolution=64, field_name="x").examples
    pixels = torch.stack([data.crop_and_flip(e.pixels, 64, center=True, flip=False) for e in examples])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        n = len(examples)
        time_ids = torch.tensor([[*e.original_size, 0, 0, 64, 64] for e in examples], dtype=torch.float32)
        added = {"text_embeds": pooled.repeat(n, 1), "time_ids": time_ids}
        total = 0.0
        for _ in range(6):
            noise = torch.randn(latents.shape, generator=gen)
            steps = torch.randint(0, 1000, (n,), generator=gen)
            noisy = scheduler.add_noise(latents, noise, steps)
            prediction = pipe.unet(noisy, steps, hidden.repeat(n, 1, 1), added_cond_kwargs=added).sample
            total += float(torch.nn.functional.mse_loss(prediction, noise))
    return total / 6


@pytest.fixture(scope="module")
def xl_lora(tiny_xl: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("xl-lora")
    spec = xl_spec(tiny_xl, photos, root / "out", maxSteps=12, learningRate=5e-3, batchSize=4)
    spec["dataset"]["centerCrop"] = True
    spec["output"]["mergeLoRA"] = True
    spec["samples"] = {"prompts": [PROMPT], "numInferenceSteps": 2}
    return _run(root, "xl", spec)


def test_sdxl_lora_learns_and_its_files_load_in_diffusers(xl_lora: Run, tiny_xl: Path, photos: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = xl_lora.output
    assert xl_lora.summary["settings"]["resolution"] == "64"
    base = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    before = denoising_loss(base, photos)
    base.load_lora_weights(out / "lora")
    after = denoising_loss(base, photos)
    assert after < before - 0.01, (before, after)

    # The kohya-layout file (SGM names, lora_te1/lora_te2) through diffusers' converter gives
    # the same model as our diffusers-layout file.
    with safe_open(str(out / "xl-lora.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL (SGM) module names
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    kohya = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    kohya.load_lora_weights(str(out / "xl-lora.safetensors"))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        ours = {k: v for k, v in getattr(base, name).state_dict().items() if "lora" in k}
        theirs = {k: v for k, v in getattr(kohya, name).state_dict().items() if "lora" in k}
        assert len(ours) > 0 and ours.keys() == theirs.keys(), name
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-7, msg=f"{name}.{key}")
    assert denoising_loss(kohya, photos) == pytest.approx(after, rel=1e-5)


def test_sdxl_single_file_loads_in_diffusers_as_the_folder_does(xl_lora: Run, tiny_xl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = xl_lora.output
    single = out / "xl.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        prefixes = {k.split(".")[0] for k in handle.keys()}  # noqa: SIM118
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert prefixes == {"model", "conditioner", "first_stage_model"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in keys)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"

    folder = StableDiffusionXLPipeline.from_pretrained(out / "diffusers")
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(tiny_xl), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        for key, value in ours.items():
            if "position_ids" not in key:
                torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    # The same UNet output, conditioned as SDXL is.
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, 80, generator=gen)
    added = {"text_embeds": torch.randn(1, 48, generator=gen), "time_ids": torch.tensor([[72.0, 96.0, 0, 4, 64, 64]])}
    with torch.no_grad():
        a = folder.unet(noisy, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
        b = loaded.unet(noisy, torch.tensor([500]), hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sdxl_dreambooth_learns_and_resumes_to_the_same_weights(tiny_xl: Path, photos: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    def spec(output: Path) -> dict[str, Any]:
        s = xl_spec(tiny_xl, photos, output, method="DreamBooth", maxSteps=8, learningRate=1e-3, batchSize=2)
        s["checkpoints"] = {"everySteps": 4, "keepLast": 2}
        s["dataset"]["randomFlip"] = True
        return s

    straight = _run(tmp_path, "straight", spec(tmp_path / "straight"))
    killed_out = tmp_path / "killed"
    job = manifest(tmp_path / "killed.yaml", name="straight", **spec(killed_out))
    killed = run_killed_while_checkpointing(job, tmp_path, step=8)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(job, killed_out, tmp_path / "resumed-log")
    assert resumed.code == ExitCode.SUCCESS, resumed.summary
    assert "training from step 4 to 8" in {e.get("message") for e in resumed.events()}
    ours = load_file(str(killed_out / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    theirs = load_file(str(straight.output / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    before = denoising_loss(pipe, photos)
    pipe.unet.load_state_dict(theirs)
    assert denoising_loss(pipe, photos) < before - 0.01


def test_time_ids_are_each_images_true_size_and_crop(tiny_xl: Path, tmp_path: Path) -> None:
    """A 96 x 64 (w x h) photo at 64 px: resized to 96 x 64 (shorter side 64), cropped to 64 x 64
    at a random left edge; flipped, the left edge is mirrored.  The time ids say (64, 96, 0,
    left, 64, 64), as diffusers' SDXL script computes them."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(photos / "wide.png")
    Image.new("RGB", (48, 80), (30, 200, 30)).save(photos / "tall.png")  # resized to 64 x 107
    spec = xl_spec(tiny_xl, photos, tmp_path / "out", maxSteps=1, batchSize=2)
    # Square crops here (buckets are SDXL's default; test_datasets.py covers them).
    spec["dataset"].update(resolution=64, randomFlip=True, buckets=False)
    for cache in (True, False):
        spec["training"]["cacheLatents"] = cache
        job = parse_manifest({"metadata": {"name": "t"}, "spec": spec})
        recipe = DreamBoothRecipe(job, reporter=ProgressReporter(job="t", enabled=False))
        seen: list[Any] = []
        try:
            recipe.setup()
            recipe.family.denoise = _recording(recipe.family.denoise, seen)  # type: ignore[method-assign]
            for micro_batch in range(6):
                with torch.no_grad():
                    recipe.loss(micro_batch)
        finally:
            del recipe.family.denoise
            recipe.cleanup()
        rows = [tuple(int(v) for v in row) for batch in seen for row in batch.tolist()]
        wide = [r for r in rows if r[:2] == (64, 96)]
        tall = [r for r in rows if r[:2] == (80, 48)]
        assert wide and tall and len(wide) + len(tall) == len(rows), rows
        assert all(r[2] == 0 and 0 <= r[3] <= 32 and r[4:] == (64, 64) for r in wide), wide
        assert all(r[3] == 0 and 0 <= r[2] <= 43 and r[4:] == (64, 64) for r in tall), tall
        if cache:
            # One crop per image, cached; a flipped draw mirrors its left edge: left + left' = 96 - 64.
            lefts = {r[3] for r in wide}
            assert len(lefts) <= 2 and (len(lefts) == 1 or sum(lefts) == 32), lefts
        else:
            assert len({r for r in wide} | {r for r in tall}) > 2  # crops drawn anew


def _recording(denoise: Any, seen: list[Any]) -> Any:
    def spy(unet: Any, noisy: Any, timesteps: Any, conditioning: Any, time_ids: Any) -> Any:
        seen.append(time_ids.clone())
        return denoise(unet, noisy, timesteps, conditioning, time_ids)

    return spy


def test_the_sdxl_vae_runs_in_fp32_unless_a_replacement_is_given(tiny_xl: Path, photos: Path, tmp_path: Path) -> None:
    spec = xl_spec(tiny_xl, photos, tmp_path / "out", maxSteps=1, mixedPrecision="bf16")
    run = _run(tmp_path, "vae", spec)
    (warning,) = [w for w in run.summary["warnings"] if w.startswith("spec.baseModel.vaeUri")]
    assert "overflows in fp16" in warning and "runs in fp32" in warning
    # A replacement VAE (here: the same tiny one, as a folder of its own) runs in the low precision.
    spec = xl_spec(tiny_xl, photos, tmp_path / "out2", maxSteps=1, mixedPrecision="bf16")
    spec["baseModel"]["vaeUri"] = (tiny_xl / "vae").as_uri()
    run = _run(tmp_path, "vae2", spec)
    assert not [w for w in run.summary["warnings"] if w.startswith("spec.baseModel.vaeUri")]
    manifest_data = json.loads((run.output / "manifest.json").read_text())
    assert manifest_data["spec"]["baseModel"]["vaeUri"] == (tiny_xl / "vae").as_uri()


def test_an_sdxl_run_that_cannot_fit_its_gpu_is_refused_naming_what_would(tmp_path: Path) -> None:
    from finetune_trainer.families import family_of
    from finetune_trainer.job import memory_check

    def spec(**training: Any) -> Any:
        raw = xl_spec(Path("/m"), Path("/d"), tmp_path / "o", method=training.pop("method", "DreamBooth"), **training)
        raw["dataset"].pop("resolution")
        return parse_manifest({"spec": raw}).spec

    family = family_of("sdxl")
    gib = 2**30
    # A full-UNet DreamBooth at 1024 px does not fit 24 GB: refused, naming LoRA.
    problem = memory_check(
        spec(optimizer="AdamW8bit"), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=24 * gib
    )
    assert problem is not None
    assert problem.startswith("spec.method: ") or "method: LoRA" in problem
    assert "24.0 GiB" in problem
    # LoRA with gradient checkpointing and 8-bit AdamW fits 16 GB (diffusers' figure).
    assert (
        memory_check(
            spec(method="LoRA", optimizer="AdamW8bit"),
            family,
            mixed_precision="fp16",
            optimizer="AdamW8bit",
            gpu_bytes=16 * gib,
        )
        is None
    )
    # Without gradient checkpointing it does not, and the message names the switch.
    problem = memory_check(
        spec(method="LoRA", gradientCheckpointing=False),
        family,
        mixed_precision="fp16",
        optimizer="AdamW8bit",
        gpu_bytes=16 * gib,
    )
    assert problem is not None and "spec.training.gradientCheckpointing: true" in problem
    # On an 80 GB GPU the DreamBooth run goes ahead.
    assert memory_check(spec(), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=80 * gib) is None
    assert numpy.isfinite(family.memory_needed(spec(), mixed_precision="bf16", optimizer="AdamW").bytes)
