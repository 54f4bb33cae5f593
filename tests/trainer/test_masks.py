"""Masked loss (spec.dataset.masks): masks from a folder beside the photos or from their alpha,
counted on the resource; a mask of the wrong size is refused naming it; the loss counts only
what the mask covers (the UNet gets no gradient from the rest), and a white mask is no mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer import data
from finetune_trainer.buckets import Bucket
from finetune_trainer.report import ProgressReporter
from finetune_trainer.train import DreamBoothRecipe
from tests.trainer.conftest import Run, base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

SIZE = 64


def _photos(folder: Path, count: int = 3, size: int = SIZE) -> list[Path]:
    """Photos of a red ball on blue, each a little different."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (70, 130, 180 - 20 * i))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 8, size - 8, size - 8 - 4 * i), fill=(200, 40, 40))
        path = folder / f"p{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def _mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> Path:
    """A mask: white inside ``box`` (x0, y0, x1, y1, exclusive), black elsewhere; all white without one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("L", size, 255 if box is None else 0)
    if box is not None:
        ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    image.save(path)
    return path


def _run(tmp_path: Path, name: str, spec: dict[str, Any]) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    return run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")


def _spec(model: Path, photos: Path, output: Path, **dataset: Any) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=1)
    spec["dataset"].update(dataset)
    return spec


def _recipe(spec: dict[str, Any], name: str = "m") -> DreamBoothRecipe:
    job = parse_manifest({"metadata": {"name": name}, "spec": spec})
    return DreamBoothRecipe(job, reporter=ProgressReporter(job=name, enabled=False))


# --- reading masks ---------------------------------------------------------------------------------


def test_masks_from_a_folder_train_and_are_counted_and_a_photo_without_one_is_named(
    tiny_model: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    # JPEG masks for PNG photos: the same name, any image extension.
    _mask(photos / "masks" / "p0.jpg", (SIZE, SIZE), (0, 0, 32, 32))
    _mask(photos / "masks" / "p1.png", (SIZE, SIZE), None)
    run = _run(tmp_path, "folder", _spec(tiny_model, photos, tmp_path / "out", masks={}))
    assert run.code == ExitCode.SUCCESS, run.summary
    assert run.summary["dataset"]["masked"] == 2
    assert run.summary["dataset"]["images"] == 3, "the masks are not photos"
    warnings = run.summary["warnings"]
    assert any("spec.dataset.masks: 1 photo(s) have no mask" in w and "p2.png" in w for w in warnings), warnings
    assert any("2 with a mask" in (e.get("message") or "") for e in run.events())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| masked loss | masks from a 'masks' folder, background weight 0 |" in card


def test_masks_from_the_photos_alpha(tiny_model: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = _photos(photos)
    # p0: cut out (transparent but for a square); p1: RGBA but opaque, which masks nothing.
    for path, box in ((paths[0], (16, 16, 48, 48)), (paths[1], None)):
        rgba = Image.open(path).convert("RGBA")
        rgba.putalpha(Image.open(_mask(tmp_path / "alpha" / path.name, rgba.size, box)))
        rgba.save(path)
    spec = _spec(tiny_model, photos, tmp_path / "out", masks={"source": "alpha"}, maskedLossBackground=0.25)
    recipe = _recipe(spec)
    try:
        recipe.setup()
        by_name = {e.path.name: e for e in recipe.instance}
        mask = by_name["p0.png"].mask
        assert mask is not None and tuple(mask.shape) == (1, SIZE, SIZE)
        assert int(mask[0, 32, 32]) == 255 and int(mask[0, 2, 2]) == 0
        assert by_name["p1.png"].mask is None and by_name["p2.png"].mask is None
        # The photo itself is the cut-out on white, as without masks.
        assert tuple(int(v) for v in by_name["p0.png"].pixels[:, 2, 2]) == (255, 255, 255)
    finally:
        recipe.cleanup()


def test_a_mask_of_another_size_is_refused_naming_it(tiny_model: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    _mask(photos / "masks" / "p0.png", (SIZE, SIZE), None)
    _mask(photos / "masks" / "p1.png", (SIZE, SIZE // 2), None)
    run = _run(tmp_path, "size", _spec(tiny_model, photos, tmp_path / "out", masks={}))
    assert run.code == ExitCode.BAD_INPUT
    message = run.summary["message"]
    assert message.startswith("spec.dataset.masks: "), message
    assert "p1.png is 64x32 but its photo p1.png is 64x64; a mask must be the size of its photo" in message
    assert not [e for e in run.events() if e["stage"] == "training"]


def test_masks_where_there_are_none_are_refused_naming_the_folder(tiny_model: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _photos(photos)
    _mask(photos / "mask" / "p0.png", (SIZE, SIZE), None)  # not the folder asked for
    run = _run(tmp_path, "none", _spec(tiny_model, photos, tmp_path / "out", masks={"folder": "segmented"}))
    assert run.code == ExitCode.BAD_INPUT
    message = run.summary["message"]
    assert message.startswith("spec.dataset.masks: no photo has a mask"), message
    assert "'segmented' folder" in message and "remove spec.dataset.masks" in message


def test_an_imagefolders_masks_are_not_photos(tiny_model: Path, tmp_path: Path) -> None:
    photos = tmp_path / "hf"
    _photos(photos / "train")
    _mask(photos / "train" / "masks" / "p0.png", (SIZE, SIZE), (0, 0, 16, 16))
    rows = [{"file_name": f"train/p{i}.png", "text": f"a photo of sks ball {i}"} for i in range(3)]
    (photos / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = _run(tmp_path, "hf", _spec(tiny_model, photos, tmp_path / "out", masks={}))
    assert run.code == ExitCode.SUCCESS, run.summary
    assert (run.summary["dataset"]["images"], run.summary["dataset"]["masked"]) == (3, 1)


# --- the loss --------------------------------------------------------------------------------------


def test_a_mask_is_cropped_and_flipped_with_its_photo() -> None:
    gen = torch.Generator().manual_seed(0)
    bucket = Bucket(32, 40)
    # Photos resized to cover the bucket (as they are read): wider, then taller than it.
    for shape in ((3, 32, 56), (3, 48, 40)):
        pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        mask = pixels[:1].clone()  # the mask is the photo's red channel: they must stay aligned
        for flip in (False, True):
            for seed in range(4):
                crop, corner = data.crop_at(
                    pixels, bucket, center=False, flip=flip, gen=torch.Generator().manual_seed(seed)
                )
                weights = data.mask_weights([mask], bucket, [corner], [flip], size=(32, 40), background=0.0)
                torch.testing.assert_close(weights[0, 0] * 2 - 1, crop[0], rtol=0, atol=1e-6)
    # At the latents' size each weight is its pixels' mean, lifted to the background's floor.
    white_corner = torch.zeros((1, 32, 32), dtype=torch.uint8)
    white_corner[:, :8, :8] = 255
    weights = data.mask_weights([white_corner, None], Bucket(32, 32), [(0, 0)] * 2, [False] * 2, size=(8, 8),
                                background=0.25)  # fmt: skip
    assert weights.shape == (2, 1, 8, 8)
    assert float(weights[0, 0, 0, 0]) == 1.0 and float(weights[0, 0, 1, 1]) == 1.0
    assert float(weights[0, 0, 2, 2]) == 0.25 and float(weights[0, 0, 7, 7]) == 0.25
    assert torch.equal(weights[1], torch.ones((1, 8, 8)))


def _loss_and_prediction_grad(spec: dict[str, Any]) -> tuple[float, torch.Tensor]:
    """One micro-batch's loss and the gradient that reaches the UNet's output."""
    recipe = _recipe(spec)
    seen: dict[str, torch.Tensor] = {}
    try:
        recipe.setup()
        unet = recipe.unet

        def spy(*args: Any, **kwargs: Any) -> Any:
            out = unet(*args, **kwargs)
            out.sample.retain_grad()
            seen["prediction"] = out.sample
            return out

        recipe.unet = spy
        loss = recipe.loss(0)
        loss.backward()
        grad = seen["prediction"].grad
        assert grad is not None
        return float(loss.detach()), grad.detach().clone()
    finally:
        recipe.cleanup()


def _masked_photos(tmp_path: Path, box: tuple[int, int, int, int] | None) -> Path:
    photos = tmp_path / "photos"
    for path in _photos(photos):
        _mask(photos / "masks" / path.name, (SIZE, SIZE), box)
    return photos


def _loss_spec(model: Path, photos: Path, output: Path, **dataset: Any) -> dict[str, Any]:
    spec = _spec(model, photos, output, centerCrop=True, **dataset)
    spec["training"]["batchSize"] = 2
    return spec


@pytest.mark.parametrize("cache", [True, False], ids=["latent-cache", "encoded-each-step"])
def test_the_unet_gets_no_gradient_from_outside_the_mask(tiny_model: Path, tmp_path: Path, cache: bool) -> None:
    # White only in the top-left 16x16 pixels: the top-left 4x4 of the tiny VAE's 16x16 latents.
    photos = _masked_photos(tmp_path, (0, 0, 16, 16))
    spec = _loss_spec(tiny_model, photos, tmp_path / "out", masks={})
    spec["training"]["cacheLatents"] = cache
    _, grad = _loss_and_prediction_grad(spec)
    assert grad.shape[-2:] == (16, 16)
    outside = grad.clone()
    outside[..., :4, :4] = 0
    assert torch.count_nonzero(outside) == 0, "a gradient from where the mask is black"
    assert torch.count_nonzero(grad[..., :4, :4]) == grad[..., :4, :4].numel()

    # With a floor for the background, the background counts that much.
    _, floored = _loss_and_prediction_grad(
        _loss_spec(tiny_model, photos, tmp_path / "out-floor", masks={}, maskedLossBackground=0.5)
    )
    torch.testing.assert_close(floored[..., :4, :4], grad[..., :4, :4])
    assert torch.count_nonzero(floored[..., 4:, 4:]) == floored[..., 4:, 4:].numel()


@pytest.mark.parametrize("flip", [False, True])
def test_a_white_mask_is_the_unmasked_loss(tiny_model: Path, tmp_path: Path, flip: bool) -> None:
    photos = _masked_photos(tmp_path, None)
    extra = {"randomFlip": flip}
    unmasked = _loss_and_prediction_grad(_loss_spec(tiny_model, photos, tmp_path / "a", **extra))
    white = _loss_and_prediction_grad(_loss_spec(tiny_model, photos, tmp_path / "b", masks={}, **extra))
    assert white[0] == pytest.approx(unmasked[0], rel=1e-6)
    torch.testing.assert_close(white[1], unmasked[1], rtol=1e-6, atol=0)
