"""The trainer end to end on a tiny pipeline, through its command line, as a user runs it.

One "straight" run (8 steps, a checkpoint every 4, samples every 3, prior preservation, text
encoder training, the web-UI tutorial's fp16/xformers/8-bit settings, which fall back on a
CPU) feeds the export, sample, picture, report and resume tests; a second, longer run checks
that training learns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from finetune_trainer.storage import sha256_file
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing
from tests.trainer.operator_stub import Operator

pytestmark = pytest.mark.trainer

STEPS, EVERY = 8, 4
SAMPLE_EVERY, SAMPLE_STEPS = 3, (3, 6, 8)  # and always the last step
PROMPTS = ["a photo of sks ball", "a red ball on the beach"]
NAME = "tiny-db"


def straight_spec(model: Path, photos: Path, output: Path) -> dict[str, Any]:
    spec = base_spec(
        model,
        photos,
        output,
        maxSteps=STEPS,
        batchSize=2,
        gradientAccumulationSteps=2,
        lrScheduler="cosine",
        lrWarmupSteps=2,
        # The tutorial's settings: on a CPU they fall back, and say so.
        optimizer="AdamW8bit",
        mixedPrecision="fp16",
        attention="xformers",
        trainTextEncoder=True,
        seed=1234,
    )
    spec["dataset"].update(classPrompt="a photo of a ball", priorPreservation=True, numClassImages=2, randomFlip=True)
    spec["checkpoints"] = {"everySteps": EVERY, "keepLast": 2}
    spec["output"]["halfPrecision"] = True
    spec["samples"] = {"prompts": PROMPTS, "everySteps": SAMPLE_EVERY, "numInferenceSteps": 3, "seed": 7}
    return spec


@pytest.fixture(scope="module")
def operator() -> Iterator[Operator]:
    server = Operator()
    yield server
    server.close()


@pytest.fixture(scope="module")
def straight(tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory, operator: Operator) -> Run:
    root = tmp_path_factory.mktemp("straight")
    output = root / "out"
    job = manifest(root / "job.yaml", name=NAME, **straight_spec(tiny_model, photos, output))
    return run_cli(
        job,
        output,
        root / "termination-log",
        FINETUNE_REPORT_URL=operator.url,
        FINETUNE_REPORT_TOKEN="tok-123",
        FINETUNE_ATTEMPT="tiny-db-pod-0",
    )


# --- a whole run and its exports -----------------------------------------------------------------


def test_run_ends_with_every_export_and_a_manifest(straight: Run) -> None:
    assert straight.code == ExitCode.SUCCESS, straight.summary
    out = straight.output
    assert (out / "diffusers" / "model_index.json").is_file()
    assert (out / f"{NAME}.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000008"]
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")], "nothing half-written is left"

    manifest_data = json.loads((out / "manifest.json").read_text())
    assert manifest_data["step"] == STEPS
    assert manifest_data["settings"]["mixed_precision"] == "no"
    listed = {f["path"]: f for f in manifest_data["files"]}
    exported = {p.relative_to(out).as_posix() for p in (out / "diffusers").rglob("*") if p.is_file()}
    assert set(listed) == exported | {f"{NAME}.safetensors", "loss.png", "samples.png", "README.md"}
    assert manifest_data["samples"] == [f"samples/step-{s:06d}-{i}.png" for s in SAMPLE_STEPS for i in (0, 1)]
    for path, entry in listed.items():
        assert entry["sizeBytes"] == (out / path).stat().st_size
        assert entry["sha256"] == sha256_file(out / path)


def test_a_model_card_says_what_was_trained_and_how_to_load_each_file(straight: Run) -> None:
    card = (straight.output / "README.md").read_text()
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == straight_spec_base(straight) and meta["library_name"] == "diffusers"
    assert "dreambooth" in meta["tags"] and meta["instance_prompt"] == "a photo of sks ball"
    assert f"trained for {STEPS} steps" in body
    assert "Class prompt: `a photo of a ball`, prior preservation with 2 class images" in body
    # Every exported file is listed (the folder once), and each kind says how to load it.
    for path in (f"{NAME}.safetensors", "diffusers/", "loss.png", "samples.png"):
        assert f"| `{path}` |" in body, path
    assert 'StableDiffusionPipeline.from_pretrained("diffusers")' in body
    assert "models/Stable-diffusion/" in body and f'from_single_file("{NAME}.safetensors")' in body
    assert "![loss](loss.png)" in body and "![samples](samples.png)" in body
    # The settings that ran, not only the ones asked for (fp16 falls back to fp32 on a CPU).
    assert f"| mixed precision | {straight.summary['settings']['mixed_precision']} |" in body
    assert "| mixed precision | no |" in body
    assert "README.md" in {f["path"] for f in json.loads((straight.output / "manifest.json").read_text())["files"]}


def straight_spec_base(run: Run) -> str:
    return str(json.loads((run.output / "manifest.json").read_text())["baseModel"]["uri"])


def test_the_single_file_is_fp16_in_the_original_layout(straight: Run) -> None:
    path = straight.output / f"{NAME}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        dtypes = {handle.get_tensor(k).dtype for k in keys}
        metadata = handle.metadata()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert sum(k.startswith("model.diffusion_model.") for k in keys) > 50
    assert dtypes == {torch.float16, torch.int64}  # int64: CLIP's position ids, as in SD 1.x files
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"


def _generate(pipe: Any, tmp_path: Path, name: str) -> Path:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of sks ball", num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    path = tmp_path / name
    image.save(path)
    assert image.size == (64, 64)
    assert len(numpy.unique(numpy.asarray(image).reshape(-1, 3), axis=0)) > 10  # an image, not a blank
    return path


def test_exports_load_and_generate_in_diffusers(straight: Run, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = straight.output / "diffusers"
    from_folder = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    _generate(from_folder, tmp_path, "from-folder.png")
    from_file = StableDiffusionPipeline.from_single_file(
        str(straight.output / f"{NAME}.safetensors"),
        config=str(folder),
        local_files_only=True,
        dtype=torch.float32,
    )
    _generate(from_file, tmp_path, "from-single-file.png")
    # Both carry the very same trained weights.
    for a, b in ((from_folder.unet, from_file.unet), (from_folder.text_encoder, from_file.text_encoder)):
        theirs = b.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in a.state_dict().items() if "position_ids" not in k)


def test_the_half_precision_folder_loads_and_generates_the_plain_way(straight: Run, tmp_path: Path) -> None:
    """As a user loads it: no dtype argument (diffusers' UNet and VAE default to fp32, and
    transformers 5 would load an fp16 text encoder as fp16), then moved to a device."""
    from diffusers import StableDiffusionPipeline

    folder = straight.output / "diffusers"
    plain = StableDiffusionPipeline.from_pretrained(folder)
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    _generate(plain, tmp_path, "plain.png")
    _generate(plain.to("cpu"), tmp_path, "plain-to-device.png")
    # The files are half precision (the "half model"), and asking for fp16 gets fp16 throughout.
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
        # Named as every transformers version names them (earlier ones read no other names).
        assert all(k.startswith("text_model.") for k in handle.keys())  # noqa: SIM118
    half = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}


def test_the_single_file_can_be_the_next_base_model(straight: Run) -> None:
    """Our own export, read back by the trainer's loader (architecture from its metadata,
    tokenizer from the diffusers folder beside it), holds the trained weights."""
    from diffusers import UNet2DConditionModel

    from finetune_api.v1alpha1 import BaseModelSource
    from finetune_trainer.model import load_base_model

    single = straight.output / f"{NAME}.safetensors"
    base = load_base_model(BaseModelSource(uri=str(single), type="v1x"), cache_dir=straight.output.parent / "cache")
    trained = UNet2DConditionModel.from_pretrained(straight.output / "diffusers", subfolder="unet")
    expected = trained.state_dict()
    assert all(torch.equal(v.half().float(), expected[k].float()) for k, v in base.unet.state_dict().items())
    assert base.tokenizer("a photo of sks ball").input_ids[0] == base.tokenizer.bos_token_id


def test_progress_reaches_the_operator_and_the_termination_message(straight: Run, operator: Operator) -> None:
    received = [body for body, _ in operator.received if body.get("attempt") == "tiny-db-pod-0"]
    assert {auth for _, auth in operator.received} == {"Bearer tok-123"}
    stages = [body["stage"] for body in received]
    for stage in ("downloading", "class-images", "caching", "training", "checkpointing", "exporting"):
        assert stage in stages
    assert stages[-1] == "done"
    final = received[-1]
    assert final["step"] == STEPS
    assert final["totalSteps"] == STEPS
    assert final["outputUri"] == str(straight.output)
    assert {c["step"] for c in final["checkpoints"]} == {4, 8}
    assert f"{NAME}.safetensors" in {f["path"] for f in final["files"]}
    training = [b for b in received if b["stage"] == "training" and b["step"] > 0]
    assert training
    assert all(b["loss"] > 0 and b["learningRate"] >= 0 for b in training)
    assert max(b["learningRate"] for b in training) > 0
    assert all(b.get("stepsPerSecond", 1) > 0 for b in training)
    # The fallbacks are on the resource, not only in a log.
    assert any(w.startswith("spec.training.mixedPrecision: fp16 needs a CUDA GPU") for w in final["warnings"])
    assert any(w.startswith("spec.training.attention: xformers needs a CUDA GPU") for w in final["warnings"])
    assert final["settings"]["attention"] == "sdpa"
    # Every progress event is a JSON line in the log, with the job's name; the push sends
    # them in order, skipping only those a newer one superseded while a post was under way.
    logged = [e["seq"] for e in straight.events()]
    pushed = [b["seq"] for b in received]
    assert pushed == sorted(set(pushed))
    assert set(pushed) <= set(logged)
    assert pushed[-1] == logged[-1]
    assert all(line["job"] == NAME for line in straight.lines)

    summary = straight.summary
    assert summary["phase"] == "Succeeded"
    assert summary["step"] == STEPS
    assert summary["outputUri"] == str(straight.output)
    assert summary["warnings"] == final["warnings"]


# --- samples and pictures ------------------------------------------------------------------------


def _sample_paths(output: Path) -> list[Path]:
    return [output / "samples" / f"step-{step:06d}-{index}.png" for step in SAMPLE_STEPS for index in (0, 1)]


def _pixels(path: Path) -> numpy.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return numpy.asarray(image.convert("RGB"))


def test_samples_appear_at_the_asked_steps_and_in_the_summary(straight: Run, operator: Operator) -> None:
    from PIL import Image

    expected = _sample_paths(straight.output)
    assert sorted((straight.output / "samples").iterdir()) == expected
    for path in expected:
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert image.info["parameters"].startswith(PROMPTS[int(path.stem[-1])])
            assert "Seed: 7" in image.info["parameters"]
    # The same noise at every step: what differs between steps is what training changed.
    assert not numpy.array_equal(_pixels(expected[0]), _pixels(expected[-2]))
    assert straight.summary["samples"] == [str(p) for p in expected]

    received = [body for body, _ in operator.received if body.get("attempt") == "tiny-db-pod-0"]
    assert received[-1]["samples"] == [str(p) for p in expected]
    # Listed as soon as they exist, while training goes on.
    first = next(e for e in straight.events() if e.get("samples"))
    assert first["step"] == SAMPLE_STEPS[0]
    assert first["samples"] == [str(p) for p in expected[:2]]
    assert "sampling" in {e["stage"] for e in straight.events()}


def test_thumbnails_of_the_newest_samples_travel_with_the_report(straight: Run, operator: Operator) -> None:
    import base64
    import io

    from PIL import Image

    final = [body for body, _ in operator.received if body.get("attempt") == "tiny-db-pod-0"][-1]
    thumbnails = final["thumbnails"]
    assert [(t["name"], t["step"], t["prompt"]) for t in thumbnails] == [
        ("step-000008-0.png", 8, PROMPTS[0]),
        ("step-000008-1.png", 8, PROMPTS[1]),
    ]
    for thumbnail in thumbnails:
        with Image.open(io.BytesIO(base64.b64decode(thumbnail["jpegBase64"]))) as image:
            assert image.format == "JPEG"
            assert max(image.size) <= 128
    assert sum(len(t["jpegBase64"]) for t in thumbnails) <= 96 * 1024


def test_loss_and_contact_sheet_pictures_open_at_their_size(straight: Run) -> None:
    from PIL import Image

    from finetune_trainer import pictures

    out = straight.output
    listed = {f["path"]: f for f in straight.summary["files"]}
    for name in ("loss.png", "samples.png"):
        assert listed[name]["sha256"] == sha256_file(out / name)

    with Image.open(out / "loss.png") as image:
        assert image.size == pictures.LOSS_SIZE_PX
    loss = _pixels(out / "loss.png").astype(int)

    def drawn(color: tuple[int, int, int]) -> int:
        return int((numpy.abs(loss - numpy.array(color)).sum(axis=2) < 30).sum())

    assert drawn((8, 81, 156)) > 200  # the smoothed loss curve
    assert drawn((217, 72, 1)) > 200  # the learning rate, on its own axis

    with Image.open(out / "samples.png") as image:
        assert image.size == pictures.sheet_size(len(SAMPLE_STEPS), len(PROMPTS), 64)
    sheet = _pixels(out / "samples.png")
    # Row r, column c is the sample of step r for prompt c.
    for row, step in enumerate(SAMPLE_STEPS):
        for column in range(len(PROMPTS)):
            left, top = pictures.cell_origin(row, column, 64)
            sample = _pixels(out / "samples" / f"step-{step:06d}-{column}.png")
            assert numpy.array_equal(sheet[top : top + 64, left : left + 64], sample), (step, column)


# --- learning --------------------------------------------------------------------------------


def _denoising_loss(model_dir: Path, unet_weights: dict[str, torch.Tensor] | None, photos: Path) -> float:
    """The epsilon loss on the training photos at fixed noise and timesteps (the same draws
    for every model compared)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from finetune_trainer import data

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    if unet_weights is not None:
        pipe.unet.load_state_dict(unet_weights)
    folder = data.load_folder(photos, prompt="a photo of sks ball", resolution=64, field_name="photos")
    pixels = torch.stack([data.crop_and_flip(e.pixels, 64, center=True, flip=False) for e in folder.examples])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(["a photo of sks ball"] * len(pixels), padding="max_length", return_tensors="pt")
        hidden = pipe.text_encoder(ids.input_ids)[0]
        losses = []
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (len(latents),), generator=gen)
            pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_training_overfits_a_fixed_tiny_set(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=40, batchSize=4, lrScheduler="constant", seed=5)
    spec["dataset"]["centerCrop"] = True
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), output, tmp_path / "termination-log")
    assert run.code == 0, run.summary
    trained = load_file(str(output / "checkpoints" / "checkpoint-000040" / "model.safetensors"))
    before = _denoising_loss(tiny_model, None, photos)
    after = _denoising_loss(tiny_model, trained, photos)
    assert after < 0.5 * before, (before, after)
    assert 0 < run.events()[-1]["loss"] < before  # the smoothed training loss on the resource


# --- resume --------------------------------------------------------------------------------------


def test_a_killed_run_resumes_to_the_same_weights(
    straight: Run, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    job = manifest(tmp_path / "job.yaml", name=NAME, **straight_spec(tiny_model, photos, output))
    killed = run_killed_while_checkpointing(job, tmp_path, step=STEPS)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-000004", ".tmp-checkpoint-000008"]
    assert not (output / "manifest.json").exists()
    class_images = {p.name: p.stat().st_mtime_ns for p in (output / "class_images").iterdir()}
    assert len(class_images) == 2

    resumed = run_cli(job, output, tmp_path / "termination-log")
    assert resumed.code == 0, resumed.summary

    # It went on from step 4, not from 0 or 8, and did 8 steps in all, not 12.
    training = [e for e in resumed.events() if e["stage"] == "training"]
    assert training[0]["step"] == EVERY
    assert training[0]["message"] == f"training from step {EVERY} to {STEPS}"
    assert resumed.summary["step"] == STEPS
    assert json.loads((output / "manifest.json").read_text())["step"] == STEPS
    assert any(line.get("event") == "resume" for line in resumed.lines)

    # The class images were generated once, by the first attempt, and reused.
    assert {p.name: p.stat().st_mtime_ns for p in (output / "class_images").iterdir()} == class_images
    assert "class-images" not in {e["stage"] for e in resumed.events()}
    assert any(line.get("event") == "class-images-reused" for line in resumed.lines)

    # The same final weights as the run that was never interrupted (fp32 checkpoints).
    for part in ("model.safetensors", "model_1.safetensors"):  # the UNet, the text encoder
        ours = load_file(str(output / "checkpoints" / "checkpoint-000008" / part))
        theirs = load_file(str(straight.output / "checkpoints" / "checkpoint-000008" / part))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{part}: {key}")
    # Samples made before the kill are kept, the rest made after: the same pictures.
    for ours_path, theirs_path in zip(_sample_paths(output), _sample_paths(straight.output), strict=True):
        assert numpy.array_equal(_pixels(ours_path), _pixels(theirs_path)), ours_path.name
    # loss.png shows the whole run: the steps before the checkpoint come from it.
    history = json.loads((output / "checkpoints" / "checkpoint-000008" / "trainer_state.json").read_text())
    reference = json.loads((straight.output / "checkpoints" / "checkpoint-000008" / "trainer_state.json").read_text())
    assert [h[0] for h in history["loss_history"]] == list(range(1, STEPS + 1))
    numpy.testing.assert_allclose(history["loss_history"], reference["loss_history"], rtol=1e-5)
    # (Tensors, not file hashes: safetensors writes its header's keys in no fixed order.)
    ours = load_file(str(output / f"{NAME}.safetensors"))
    theirs = load_file(str(straight.output / f"{NAME}.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not [p for p in output.rglob("*") if p.name.startswith(".tmp-")]


def test_a_run_whose_last_checkpoint_is_final_only_exports(straight: Run, tmp_path: Path) -> None:
    """A retry after a crash during export does not train again."""
    (straight.output / "manifest.json").unlink()
    job = straight.output.parent / "job.yaml"
    again = run_cli(job, straight.output, tmp_path / "termination-log")
    assert again.code == 0, again.summary
    assert "training" not in {e["stage"] for e in again.events()}
    assert json.loads((straight.output / "manifest.json").read_text())["step"] == STEPS


# --- bad input and out of memory --------------------------------------------------------------


def _bad(tmp_path: Path, spec: dict[str, Any]) -> Run:
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "termination-log")
    assert run.code == ExitCode.BAD_INPUT, run.summary
    assert run.summary["phase"] == "Failed"
    assert run.summary["reason"] == "BadInput"
    assert run.events()[-1]["stage"] == "failed"
    return run


def test_no_images_is_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = _bad(tmp_path, base_spec(tiny_model, empty, tmp_path / "out"))
    assert run.summary["message"].startswith(f"spec.dataset.instanceImages: {empty} holds no images")


def test_a_folder_of_corrupt_files_is_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "face.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (corrupt / "face2.PNG").write_text("not a png")
    run = _bad(tmp_path, base_spec(tiny_model, corrupt, tmp_path / "out"))
    message = run.summary["message"]
    assert message.startswith("spec.dataset.instanceImages: ")
    assert "face.jpg is not a readable image" in message


def test_a_missing_base_model_is_bad_input(photos: Path, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "sd15"
    run = _bad(tmp_path, base_spec(missing, photos, tmp_path / "out"))
    assert run.summary["message"].startswith(f"spec.baseModel.uri: {missing} does not exist")


def test_a_model_type_that_does_not_match_the_checkpoint_is_bad_input(
    straight: Run, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    single = straight.output / f"{NAME}.safetensors"  # an SD 1.x-layout file
    spec = base_spec(single, photos, tmp_path / "out")
    spec["baseModel"]["type"] = "v2x"
    run = _bad(tmp_path, spec)
    assert run.summary["message"] == (
        f"spec.baseModel.type: v2x does not match the checkpoint: {NAME}.safetensors is an SD 1.x checkpoint "
        "(CLIP text encoder); set spec.baseModel.type to v1x"
    )
    # A diffusers folder trained for epsilon, declared v-prediction.
    spec = base_spec(tiny_model, photos, tmp_path / "out")
    spec["baseModel"]["type"] = "v2x"
    run = _bad(tmp_path, spec)
    assert "v2x trains with v_prediction prediction" in run.summary["message"]
    assert "set spec.baseModel.type to v1x or v2x-512" in run.summary["message"]


def test_a_pvc_uri_on_a_workstation_is_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    spec = base_spec(tiny_model, tmp_path, tmp_path / "out")
    spec["dataset"]["instanceImages"] = "pvc://datasets/nick/"
    run = _bad(tmp_path, spec)
    assert "resolves to the volume's mount path" in run.summary["message"]
    assert run.summary["message"].startswith("spec.dataset.instanceImages: ")


def test_out_of_gpu_memory_exits_3_naming_settings_that_fit(
    tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer.train import DreamBoothRecipe

    def out_of_memory(self: Any, micro_batch: int) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DreamBoothRecipe, "loss", out_of_memory)
    spec = base_spec(tiny_model, photos, tmp_path / "out", batchSize=2, gradientCheckpointing=False)
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "termination-log")
    assert run.code == ExitCode.OUT_OF_MEMORY
    assert run.summary["reason"] == "OutOfMemory"
    message = run.summary["message"]
    assert message.startswith("the GPU ran out of memory at step 0")
    for fix in (
        "spec.training.gradientCheckpointing: true",
        "spec.training.optimizer: AdamW8bit",
        "spec.training.batchSize (e.g. 1",
        "spec.training.mixedPrecision: fp16",
    ):
        assert fix in message


def test_sigterm_is_transient_and_reported(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    """A pod stopped by the cluster: exit code for a retry, a summary that says why."""
    import signal

    spec = base_spec(tiny_model, photos, tmp_path / "out", maxSteps=100000)
    job = manifest(tmp_path / "job.yaml", **spec)
    log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(log), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_REPORT_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer", "run", str(job)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if '"stage": "training"' in line:
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == ExitCode.ERROR
    summary = json.loads(log.read_text())
    assert summary["phase"] == "Failed"
    assert summary["reason"] == "TrainerError"
    assert summary["message"].startswith("stopped by SIGTERM")
