"""Datasets as people keep them: each layout trains the tiny pipeline and says what it found;
photos of every shape train in aspect-ratio buckets, uncropped, one shape a batch, and resume
exactly; captions get their trigger word, dropout and shuffling; a bad dataset is refused
naming the file before the first step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer import buckets, captions, data
from finetune_trainer.report import ProgressReporter
from finetune_trainer.train import DreamBoothRecipe
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing

pytestmark = pytest.mark.trainer


def photo(path: Path, width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    """A photo of a ball of this size (PNG, or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height), (70, 130, 180))
    draw = ImageDraw.Draw(image)
    r = min(width, height) // 4
    draw.ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=colour)
    image.save(path)
    return path


def _run(tmp_path: Path, name: str, spec: dict[str, Any], **env: str) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    return run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log", **env)


def _spec(model: Path, images: Path, output: Path, **dataset: Any) -> dict[str, Any]:
    spec = base_spec(model, images, output, maxSteps=2)
    spec["dataset"].update(dataset)
    return spec


def _found(run: Run) -> dict[str, Any]:
    assert run.code == ExitCode.SUCCESS, run.summary
    events = [e for e in run.events() if e.get("dataset")]
    assert events, "the dataset is reported"
    assert events[-1]["dataset"] == run.summary["dataset"]
    return dict(run.summary["dataset"])


# --- layouts ---------------------------------------------------------------------------------------


def test_kohya_folders_with_repeats_and_regularisation_images(tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "kohya"
    for i in range(2):
        photo(root / "img" / "10_zqx ball" / f"b{i}.png", 72, 72)
    for i in range(3):
        photo(root / "img" / "4_qqy toy" / f"t{i}.png", 72, 72, (40, 200, 40))
    (root / "img" / "4_qqy toy" / "t0.txt").write_text("qqy toy on a table")
    for i in range(2):
        photo(root / "reg" / "1_ball" / f"r{i}.png", 64, 64, (90, 90, 90))
    spec = base_spec(tiny_model, root, tmp_path / "out", stepsPerImage=1, batchSize=2)
    del spec["dataset"]["instancePrompt"], spec["training"]["maxSteps"]
    spec["dataset"].update(layout="kohya", priorPreservation=True, numClassImages=2)
    run = _run(tmp_path, "kohya", spec)
    found = _found(run)
    assert found["layout"] == "kohya"
    concepts = {c["name"]: c for c in found["concepts"]}
    assert concepts["10_zqx ball"]["repeats"] == 10 and concepts["10_zqx ball"]["images"] == 2
    assert concepts["10_zqx ball"]["prompt"] == "zqx ball" and concepts["10_zqx ball"]["classImages"] == 2
    assert concepts["4_qqy toy"]["repeats"] == 4 and concepts["4_qqy toy"]["captioned"] == 1
    # An epoch is every photo as often as its folder says: (2 x 10 + 3 x 4) / batch 2 = 16 steps.
    assert run.summary["totalSteps"] == 16
    # The toy folder's class is not a regularisation folder's: it takes the first one's images, and
    # the ball's class images were read, not generated.
    assert not (tmp_path / "out" / "class_images").exists()


def test_kohya_folder_names_without_repeats_are_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "kohya"
    photo(root / "10_zqx ball" / "b.png", 72, 72)
    photo(root / "qqy toy" / "t.png", 72, 72)
    spec = base_spec(tiny_model, root, tmp_path / "out")
    del spec["dataset"]["instancePrompt"]
    spec["dataset"]["layout"] = "kohya"
    run = _run(tmp_path, "kohya", spec)
    assert run.code == ExitCode.BAD_INPUT
    assert run.summary["message"].startswith("spec.dataset.instanceImages: ")
    assert "qqy toy: a kohya folder is named '<repeats>_<token> <class>'" in run.summary["message"]
    assert not [e for e in run.events() if e["stage"] == "training"]


def test_captions_beside_photos_with_a_trigger_word(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "captioned"
    for i in range(3):
        photo(folder / f"p{i}.png", 72, 72)
    (folder / "p0.txt").write_text("a photo of [trigger] on grass")
    (folder / "p1.txt").write_text("a red ball, studio light")
    spec = _spec(tiny_model, folder, tmp_path / "out", triggerWord="zqx")
    run = _run(tmp_path, "captions", spec)
    found = _found(run)
    assert found["layout"] == "folder" and found["images"] == 3
    assert found["captionCoverage"] == pytest.approx(66.7)
    spec["output"]["uri"] = (tmp_path / "out-direct").as_uri()
    job = parse_manifest({"metadata": {"name": "c"}, "spec": spec})
    recipe = DreamBoothRecipe(job, reporter=ProgressReporter(job="c", enabled=False))
    try:
        recipe.setup()
        prompts = {e.path.name: e.prompt for e in recipe.instance}
    finally:
        recipe.cleanup()
    assert prompts == {
        "p0.png": "a photo of zqx on grass",
        "p1.png": "zqx, a red ball, studio light",
        "p2.png": "a photo of sks ball",  # no caption: the instance prompt
    }


def test_a_photo_without_a_caption_is_refused_where_captions_are_required(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "captioned"
    photo(folder / "p0.png", 72, 72)
    photo(folder / "p1.png", 72, 72)
    (folder / "p0.txt").write_text("a red ball")
    run = _run(tmp_path, "required", _spec(tiny_model, folder, tmp_path / "out", requireCaptions=True))
    assert run.code == ExitCode.BAD_INPUT
    message = run.summary["message"]
    assert message.startswith("spec.dataset.instanceImages: 1 photo(s) have no caption") and "p1.png" in message
    assert not [e for e in run.events() if e["stage"] == "training"]


def test_an_imagefolder_with_metadata_jsonl(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    for i in range(3):
        photo(folder / "train" / f"{i}.png", 72, 72)
    rows = [
        {"file_name": "train/0.png", "caption": "zqx ball, close up"},
        {"file_name": "train/1.png", "caption": "zqx"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = _spec(tiny_model, folder, tmp_path / "out", captionColumn="caption")
    run = _run(tmp_path, "hf", spec)
    found = _found(run)
    assert found["layout"] == "imagefolder"
    # train/2.png has no row: it trains on the instance prompt.
    assert found["images"] == 3
    assert found["captionCoverage"] == pytest.approx(66.7)

    # A row naming a file that is not there is bad input naming the row.
    rows.append({"file_name": "train/9.png", "caption": "gone"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bad = _run(tmp_path, "hf-bad", _spec(tiny_model, folder, tmp_path / "out2", captionColumn="caption"))
    assert bad.code == ExitCode.BAD_INPUT
    assert "metadata.jsonl line 3 names train/9.png" in bad.summary["message"]


def test_two_concepts_in_one_job(tiny_model: Path, tmp_path: Path) -> None:
    for i in range(2):
        photo(tmp_path / "ball" / f"b{i}.png", 72, 72)
        photo(tmp_path / "toy" / f"t{i}.png", 72, 72, (40, 200, 40))
    spec = base_spec(tiny_model, tmp_path / "ball", tmp_path / "out", stepsPerImage=2)
    del spec["training"]["maxSteps"]
    dataset = spec["dataset"]
    del dataset["instanceImages"], dataset["instancePrompt"]
    dataset["concepts"] = [
        {"images": (tmp_path / "ball").as_uri(), "instancePrompt": "a photo of zqx ball", "repeats": 3},
        {"images": (tmp_path / "toy").as_uri(), "instancePrompt": "a photo of qqy toy"},
    ]
    run = _run(tmp_path, "two", spec)
    found = _found(run)
    assert found["layout"] == "concepts"
    assert [(c["prompt"], c["images"], c["repeats"]) for c in found["concepts"]] == [
        ("a photo of zqx ball", 2, 3),
        ("a photo of qqy toy", 2, 1),
    ]
    assert run.summary["totalSteps"] == 2 * (2 * 3 + 2)  # stepsPerImage x photos x repeats, batch 1


# --- buckets ---------------------------------------------------------------------------------------


def mixed_shapes(folder: Path) -> Path:
    photo(folder / "wide.png", 480, 288)  # 5:3 -> the 320x192 bucket
    photo(folder / "tall.png", 288, 480)  # 3:5 -> 192x320
    photo(folder / "square.png", 300, 300)  # -> 256x256
    photo(folder / "wide2.png", 500, 300)
    return folder


def bucket_spec(model: Path, images: Path, output: Path, **training: Any) -> dict[str, Any]:
    spec = base_spec(model, images, output, batchSize=2, **training)
    spec["dataset"].update(resolution=256, buckets=True, randomFlip=True)
    return spec


def test_mixed_shapes_train_in_buckets_uncropped_one_shape_a_batch(tiny_model: Path, tmp_path: Path) -> None:
    images = mixed_shapes(tmp_path / "mixed")
    spec = bucket_spec(tiny_model, images, tmp_path / "out", maxSteps=1)
    run = _run(tmp_path, "buckets", spec)
    found = _found(run)
    assert {(b["width"], b["height"], b["images"]) for b in found["buckets"]} == {
        (320, 192, 2),
        (192, 320, 1),
        (256, 256, 1),
    }
    spec["output"]["uri"] = (tmp_path / "out-direct").as_uri()
    job = parse_manifest({"metadata": {"name": "b"}, "spec": spec})
    recipe = DreamBoothRecipe(job, reporter=ProgressReporter(job="b", enabled=False))
    shapes: list[tuple[int, ...]] = []
    try:
        recipe.setup()
        by_name = {e.path.name: e for e in recipe.instance}
        # Resized to cover the bucket, nothing more: at most a few pixels are cropped away.
        assert tuple(by_name["wide.png"].pixels.shape[1:]) == (192, 320)
        assert tuple(by_name["tall.png"].pixels.shape[1:]) == (320, 192)
        assert by_name["wide2.png"].pixels.shape[2] - 320 <= 2
        unet = recipe.unet

        def recording(noisy: Any, *args: Any, **kwargs: Any) -> Any:
            shapes.append(tuple(noisy.shape))
            return unet(noisy, *args, **kwargs)

        recipe.unet = recording
        with torch.no_grad():
            for micro_batch in range(8):
                recipe.loss(micro_batch)
    finally:
        recipe.cleanup()
    # Latents of a quarter the size (the tiny VAE downsamples twice); every batch of 2 is one
    # bucket; every bucket comes up.
    assert set(shapes) == {(2, 4, 48, 80), (2, 4, 80, 48), (2, 4, 64, 64)}


def test_a_killed_bucketed_run_resumes_to_the_same_weights(tiny_model: Path, tmp_path: Path) -> None:
    images = mixed_shapes(tmp_path / "mixed")

    def spec(output: Path) -> dict[str, Any]:
        s = bucket_spec(tiny_model, images, output, maxSteps=6)
        s["checkpoints"] = {"everySteps": 3, "keepLast": 2}
        return s

    straight = _run(tmp_path, "straight", spec(tmp_path / "straight"))
    assert straight.code == ExitCode.SUCCESS, straight.summary
    job = manifest(tmp_path / "killed.yaml", name="straight", **spec(tmp_path / "killed"))
    killed = run_killed_while_checkpointing(job, tmp_path, step=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(job, tmp_path / "killed", tmp_path / "resumed-log")
    assert resumed.code == ExitCode.SUCCESS, resumed.summary
    assert "training from step 3 to 6" in {e.get("message") for e in resumed.events()}
    ours = load_file(str(tmp_path / "killed" / "checkpoints" / "checkpoint-000006" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-000006" / "model.safetensors"))
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_sdxl_time_ids_in_buckets_are_the_true_sizes_and_the_bucket(tmp_path: Path) -> None:
    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    model = build_tiny_sdxl_pipeline(tmp_path / "xl")
    images = mixed_shapes(tmp_path / "mixed")
    spec = bucket_spec(model, images, tmp_path / "out", maxSteps=1)
    spec["baseModel"]["type"] = "sdxl"
    del spec["dataset"]["buckets"]  # SDXL's default: on
    spec["dataset"]["centerCrop"] = True
    job = parse_manifest({"metadata": {"name": "x"}, "spec": spec})
    recipe = DreamBoothRecipe(job, reporter=ProgressReporter(job="x", enabled=False))
    seen: list[Any] = []
    try:
        recipe.setup()
        assert recipe.settings.buckets
        denoise = recipe.family.denoise

        def spy(unet: Any, noisy: Any, timesteps: Any, conditioning: Any, time_ids: Any) -> Any:
            seen.append(time_ids.clone())
            return denoise(unet, noisy, timesteps, conditioning, time_ids)

        recipe.family.denoise = spy  # type: ignore[method-assign]
        with torch.no_grad():
            for micro_batch in range(8):
                recipe.loss(micro_batch)
    finally:
        del recipe.family.denoise
        recipe.cleanup()
    rows = {tuple(int(v) for v in row) for batch in seen for row in batch.tolist()}
    # (original height, width, crop top, left, bucket height, width): wide.png 480x288 covers
    # the 320x192 bucket exactly when resized, so no crop.
    assert (288, 480, 0, 0, 192, 320) in rows
    assert (480, 288, 0, 0, 320, 192) in rows
    assert (300, 300, 0, 0, 256, 256) in rows


# --- pieces ----------------------------------------------------------------------------------------


def test_buckets_cover_the_area_within_the_limits() -> None:
    sizes = buckets.bucket_sizes(1024, min_side=512, max_side=2048, max_ratio=2.0)
    assert buckets.square(1024) in sizes
    assert buckets.Bucket(832, 1216) in sizes and buckets.Bucket(1216, 832) in sizes  # SDXL's usual ones
    for b in sizes:
        assert b.height % 64 == 0 and b.width % 64 == 0
        assert 0.85 * 1024**2 <= b.height * b.width <= 1024**2 * 1.05
        assert max(b.ratio, 1 / b.ratio) <= 2.0
    assert buckets.nearest(sizes, height=1080, width=1920) == buckets.Bucket(768, 1344)
    assert buckets.cover(1080, 1920, buckets.Bucket(768, 1344)) == (768, 1365)


def test_every_run_of_a_batch_is_one_bucket_and_repeats_count() -> None:
    order = data.ExampleOrder(5, seed=3, repeats=(1, 1, 2, 1, 3), groups=(0, 1, 0, 1, 0), group_size=2)
    for epoch in range(3):
        slots = order.epoch_order(epoch)
        assert len(slots) % 2 == 0
        for start in range(0, len(slots), 2):
            assert len({order.groups[i] for i in slots[start : start + 2]}) == 1  # type: ignore[index]
        assert slots.count(4) >= 3 and slots.count(2) >= 2
    assert order.epoch_order(0) != order.epoch_order(1)
    assert order.examples(range(20)) == data.ExampleOrder(5, 3, repeats=(1, 1, 2, 1, 3), groups=(0, 1, 0, 1, 0),
                                                         group_size=2).examples(range(20))  # fmt: skip


def test_caption_dropout_and_shuffle_keep_the_leading_tags() -> None:
    prompt = "zqx, red ball, on grass, studio light, close up"
    outcomes = []
    for slot in range(200):
        gen = data.generator(1, data.STREAM_NOISE, slot)
        outcomes.append(captions.vary(prompt, gen=gen, dropout=0.1, shuffle=True, keep_tokens=1))
    dropped = outcomes.count("")
    assert 5 < dropped < 40
    shuffled = [o for o in outcomes if o]
    assert all(o.startswith("zqx, ") for o in shuffled)
    assert all(sorted(o.split(", ")) == sorted(prompt.split(", ")) for o in shuffled)
    assert len(set(shuffled)) > 10
    same = [captions.vary(prompt, gen=data.generator(1, data.STREAM_NOISE, s), dropout=0.1, shuffle=True,
                          keep_tokens=1) for s in range(200)]  # fmt: skip
    assert same == outcomes  # drawn from the slot's generator: a resumed run repeats them


def test_prompts_longer_than_the_text_encoder_reads_are_named(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "long"
    photo(folder / "short.png", 72, 72)
    photo(folder / "long.png", 72, 72)
    (folder / "long.txt").write_text(", ".join(["a photo of sks ball"] * 40))
    run = _run(tmp_path, "long", _spec(tiny_model, folder, tmp_path / "out"))
    assert run.code == ExitCode.SUCCESS, run.summary
    (warning,) = [w for w in run.summary["warnings"] if "longer than" in w]
    assert "long.png (" in warning and "short.png" not in warning


def test_small_and_duplicate_photos_are_named(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    photo(folder / "a.png", 72, 72)
    shutil.copy(folder / "a.png", folder / "a-copy.png")
    photo(folder / "tiny.png", 20, 20)
    run = _run(tmp_path, "checks", _spec(tiny_model, folder, tmp_path / "out"))
    assert run.code == ExitCode.SUCCESS, run.summary
    warnings = run.summary["warnings"]
    assert any("upscaled" in w and "tiny.png" in w for w in warnings), warnings
    assert any("duplicates" in w and "a.png" in w and "a-copy.png" in w for w in warnings), warnings
