"""Class images for prior preservation: reuse what is there, generate only what is missing.

Generated images are written one by one under a temporary name and renamed, so a restarted
job counts the complete ones and goes on from there: each image is generated once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from finetune_trainer import data, storage
from finetune_trainer.errors import BadInput
from finetune_trainer.families import BaseModel
from finetune_trainer.job import CLASS_IMAGE_STEPS
from finetune_trainer.report import ProgressReporter
from finetune_trainer.samples import decode_outside_autocast

log = logging.getLogger("finetune_trainer")

FIELD = "spec.dataset.classImages"
OUTPUT_SUBDIR = "class_images"
INFERENCE_STEPS = CLASS_IMAGE_STEPS
GENERATION_BATCH = 4


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def plan_folders(
    wanted: int, generated_dir: Path, *, user_dir: Path | None, user_writable: bool
) -> tuple[list[Path], Path | None, int]:
    """(folders to read class images from, folder to generate into, how many to generate).

    ``user_dir`` is ``classImages`` as a local folder (for an object store, the downloaded
    copy, which is not written to).  It is used first; missing images are generated into it
    when it is writable, else into ``generated_dir`` under the output.
    """
    folders: list[Path] = []
    have = 0
    if user_dir is not None:
        folders.append(user_dir)
        have = count_images(user_dir)
        if have >= wanted:
            return folders, None, 0
        if user_writable and _writable(user_dir):
            return folders, user_dir, wanted - have
    folders.append(generated_dir)
    have += count_images(generated_dir)
    missing = max(0, wanted - have)
    return folders, (generated_dir if missing else None), missing


def generate(
    base: BaseModel,
    dest: Path,
    *,
    count: int,
    prompt: str,
    resolution: int,
    seed: int,
    device: Any,
    mixed_precision: str,
    reporter: ProgressReporter,
) -> list[Path]:
    """Generate ``count`` class images into ``dest`` with the base model."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    pipeline: Any = base.family.pipeline(base=base, unet=base.denoiser(), text_encoders=base.text_encoders)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if torch.device(device).type == "cuda" and mixed_precision in ("fp16", "bf16"):
        autocast = torch.autocast("cuda", dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)
    written: list[Path] = []
    index = 0
    while len(written) < count:
        batch = min(GENERATION_BATCH, count - len(written))
        names: list[Path] = []
        while len(names) < batch:
            candidate = dest / f"class-{index:05d}.png"
            index += 1
            if not candidate.exists():
                names.append(candidate)
        generators = [
            data.generator(seed, data.STREAM_CLASS_IMAGES, int(p.stem.split("-")[1]), device=device) for p in names
        ]
        with torch.no_grad(), autocast, decode_outside_autocast(pipeline.vae):
            images = pipeline(
                [prompt] * batch,
                height=resolution,
                width=resolution,
                num_inference_steps=INFERENCE_STEPS,
                generator=generators,
            ).images
        for image, path in zip(images, names, strict=True):
            with storage.atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            written.append(path)
        reporter.emit(message=f"generated {len(written)}/{count} class images in {dest}")
    return written


# The spread of pixel values (of 0..255) at or below which a picture is one flat colour.
BLANK_SPREAD = 2


def blank(examples: list[data.Example]) -> list[data.Example]:
    """The class images that are one flat colour: what a VAE that overflowed decodes (black), a
    picture no class prior should be learned from."""
    return [e for e in examples if int(e.pixels.max()) - int(e.pixels.min()) <= BLANK_SPREAD]


def refuse_blank(examples: list[data.Example], *, folders: list[Path], field: str) -> None:
    """Stop before training toward blank class images (left by an earlier run whose VAE
    overflowed, or given so): they would teach the model blank pictures for the class."""
    found = blank(examples)
    if not found:
        return
    names = ", ".join(sorted({e.path.name for e in found})[:3])
    where = ", ".join(str(f) for f in folders)
    raise BadInput(
        f"{len(found)} of the {len(examples)} class images in {where} are one flat colour (e.g. {names}), as a VAE "
        "that overflowed in fp16 makes them: prior preservation would train toward blank pictures; delete them "
        "(the run generates new ones in a folder of its own) or give other class images",
        field=field,
    )
