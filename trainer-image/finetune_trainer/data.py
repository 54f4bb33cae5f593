"""Training images: finding and reading them, cropping, the order they are seen in, and the
latent cache.

The order of examples and every random draw (crop, flip, noise, timesteps) is a function of
the seed and the step, not of a random state carried through the run.  That is what makes a
resumed run repeat the one that was interrupted exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"
FILEWORDS = "[filewords]"


@dataclass
class Example:
    """One training image, resized so that its shorter side is the resolution (not cropped yet)."""

    path: Path
    pixels: torch.Tensor  # uint8, 3 x H x W
    prompt: str
    # SHA-256 of the file's bytes: with the prompt (and so the caption), what the dataset
    # fingerprint hashes.
    digest: str = ""
    # (height, width) of the file before resizing: SDXL conditions on it.
    original_size: tuple[int, int] = (0, 0)


@dataclass
class ImageFolder:
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skipped_warning(self, field_name: str) -> str | None:
        if not self.skipped:
            return None
        listed = ", ".join(f"{p.name} ({why})" for p, why in self.skipped[:20])
        more = f" and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
        return f"{field_name}: skipped {len(self.skipped)} file(s) that are not usable images: {listed}{more}"


def prompt_for(caption: str | None, prompt: str) -> str:
    """The prompt for one image.  A caption file replaces the prompt, unless the prompt holds
    ``[filewords]``, which the caption then fills in (the web UI's convention)."""
    if FILEWORDS in prompt:
        return " ".join(prompt.replace(FILEWORDS, caption or "").split())
    return caption if caption else prompt


def read_image(path: Path) -> Image.Image:
    """An RGB image the right way up: EXIF orientation applied, transparency on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened) or opened
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            return canvas.convert("RGB")
        return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def load_folder(folder: Path, *, prompt: str, resolution: int, field_name: str) -> ImageFolder:
    """Every usable image in ``folder`` (not recursive), sorted by name; the rest is listed in
    ``skipped`` so that one warning can name it."""
    import torch

    if not folder.exists():
        raise BadInput(f"{folder} does not exist", field=field_name)
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder; point it at the folder that holds the images", field=field_name)
    examples: list[Example] = []
    skipped: list[tuple[Path, str]] = []
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    images = {p.with_suffix("").name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in entries:
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX:
            if path.with_suffix("").name not in images:
                skipped.append((path, "caption without an image"))
            continue
        if suffix not in IMAGE_SUFFIXES:
            skipped.append((path, "not .jpg, .jpeg, .png or .webp"))
            continue
        try:
            image = read_image(path)
        except Exception as exc:
            skipped.append((path, f"unreadable: {type(exc).__name__}"))
            continue
        caption_file = next(
            (c for c in (path.with_suffix(".txt"), path.with_suffix(".TXT")) if c.is_file()),
            None,
        )
        caption = caption_file.read_text(errors="replace").strip() if caption_file else None
        resized = resize_shorter_side(image, resolution)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        examples.append(
            Example(
                path=path,
                pixels=pixels,
                prompt=prompt_for(caption, prompt),
                digest=digest,
                original_size=(image.height, image.width),
            )
        )
    result = ImageFolder(examples=examples, skipped=skipped)
    if not examples:
        why = f" ({len(skipped)} file(s) skipped: {result.skipped_warning(field_name)})" if skipped else ""
        raise BadInput(
            f"{folder} holds no usable images (looked for .jpg, .jpeg, .png, .webp){why}; "
            "add photos of the subject to the folder",
            field=field_name,
        )
    return result


def dataset_fingerprint(*groups: Sequence[Example]) -> str:
    """What the run learns from, as a short hash: each image's file name, content hash and
    prompt (its caption included), per group (instance images, class images)."""
    listing = [[[e.path.name, e.digest, e.prompt] for e in group] for group in groups]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


# --- randomness from (seed, position) -----------------------------------------------------------


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (the run's seed and a position in the run)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)[0])


def generator(*parts: int, device: Any = "cpu") -> torch.Generator:
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(*parts))
    return gen


# Streams of randomness, kept apart so that changing one use does not shift another.
STREAM_ORDER, STREAM_AUGMENT, STREAM_NOISE, STREAM_CACHE, STREAM_CLASS_IMAGES = 1, 2, 3, 4, 5
# The class image beside each instance image (prior preservation) draws from streams of its own.
STREAM_CLASS_ORDER, STREAM_CLASS_NOISE = 6, 7


@dataclass(frozen=True)
class ExampleOrder:
    """Which example every *slot* of the run holds.

    The run is a sequence of slots, one per example seen, counted over the whole run and every
    process: optimizer step ``s``, micro-batch ``m`` of it and process ``p`` hold the slots
    ``(s * accumulation + m) * global_batch + p * batch_size + j``.  Slot ``k`` is position
    ``k % n`` of epoch ``k // n``, whose order is a permutation seeded by (seed, epoch); each
    slot's random draws (flip, crop, noise, timestep) come from a generator of its own.  So a
    batch of 2 on one process and a batch of 1 on each of two processes see the same examples
    with the same noise, and a resumed run sees what the uninterrupted one would.
    """

    num_examples: int
    seed: int
    stream: int = STREAM_ORDER

    def epoch_order(self, epoch: int) -> list[int]:
        return _permutation(self.num_examples, self.seed, self.stream, epoch)

    def example(self, slot: int) -> int:
        epoch, position = divmod(slot, self.num_examples)
        return self.epoch_order(epoch)[position]

    def examples(self, slots: Sequence[int]) -> list[int]:
        return [self.example(k) for k in slots]


@functools.lru_cache(maxsize=64)
def _permutation(n: int, seed: int, stream: int, epoch: int) -> list[int]:
    import torch

    return list(torch.randperm(n, generator=generator(seed, stream, epoch)).tolist())


def slots_of(micro_batch: int, *, batch_size: int, num_processes: int, process_index: int) -> list[int]:
    """The slots one process trains on in one micro-batch of the run."""
    first = micro_batch * batch_size * num_processes + process_index * batch_size
    return list(range(first, first + batch_size))


def crop_and_flip(
    pixels: torch.Tensor, resolution: int, *, center: bool, flip: bool, gen: torch.Generator | None = None
) -> torch.Tensor:
    """A ``resolution`` square of the image as floats in [-1, 1]."""
    return crop_at(pixels, resolution, center=center, flip=flip, gen=gen)[0]


def crop_at(
    pixels: torch.Tensor, resolution: int, *, center: bool, flip: bool, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A ``resolution`` square of the image as floats in [-1, 1], and where its top-left corner
    lies in the (flipped, where flipped) resized image: SDXL conditions on it."""
    import torch

    _, height, width = pixels.shape
    if center:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=gen))
    square = pixels[:, top : top + resolution, left : left + resolution]
    if flip:
        square = square.flip(-1)
    return square.float() / 127.5 - 1.0, (top, flipped_left(left, width, resolution) if flip else left)


def flipped_left(left: int, width: int, resolution: int) -> int:
    """The left edge of a crop once the image is mirrored (as diffusers' SDXL script records it,
    flipping first and cropping after)."""
    return width - left - resolution


def is_square(example: Example) -> bool:
    return example.pixels.shape[1] == example.pixels.shape[2]


# --- latent cache -------------------------------------------------------------------------------


class LatentCache:
    """The VAE's latent distribution (mean, std) of each example, computed once.

    Sampling from the cached distribution each step is exactly what encoding each step does,
    without the encoder.  With random flips both orientations are cached.  A random crop is
    drawn once per image here; the trainer warns where that differs from cropping each epoch.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, crops: list[list[tuple[int, int]]] | None = None) -> None:
        self.mean = mean  # examples x variants x C x h x w
        self.std = std
        # (top, left) of each example's cached crop, per variant (as crop_at reports it).
        self.crops = crops or [[(0, 0)] * mean.shape[1] for _ in range(mean.shape[0])]

    @classmethod
    def build(
        cls,
        vae: Any,
        examples: Sequence[Example],
        *,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        stream: int,
        device: Any,
        dtype: torch.dtype,
        batch_size: int = 8,
    ) -> LatentCache:
        import torch

        variants = (False, True) if random_flip else (False,)
        means: list[torch.Tensor] = []
        stds: list[torch.Tensor] = []
        crops: list[list[tuple[int, int]]] = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                pixels = []
                for offset, example in enumerate(chunk):
                    gen = generator(seed, STREAM_CACHE, stream, start + offset)
                    base, (top, left) = crop_at(example.pixels, resolution, center=center_crop, flip=False, gen=gen)
                    pixels += [base.flip(-1) if flipped else base for flipped in variants]
                    width = example.pixels.shape[2]
                    crops.append(
                        [(top, flipped_left(left, width, resolution) if flipped else left) for flipped in variants]
                    )
                batch = torch.stack(pixels).to(device=device, dtype=dtype)
                dist = vae.encode(batch).latent_dist
                shape = (len(chunk), len(variants), *dist.mean.shape[1:])
                means.append(dist.mean.float().reshape(shape))
                stds.append(dist.std.float().reshape(shape))
        return cls(torch.cat(means), torch.cat(stds), crops)

    def crop(self, index: int, flipped: bool) -> tuple[int, int]:
        variants = len(self.crops[index])
        return self.crops[index][1 if flipped and variants > 1 else 0]

    def sample(
        self, indices: Sequence[int], flips: Sequence[bool], gens: Sequence[torch.Generator], *, pin: bool = False
    ) -> torch.Tensor:
        """Latents of the examples at ``indices`` (flipped where asked), on the cache's device,
        each sampled with the noise of its own generator.

        Each example is picked with plain integers (a view: no index tensor travels to the
        GPU), and the noise comes from seeded CPU generators (``pin``: into pinned memory, for
        a copy to the GPU that does not wait for it)."""
        import torch

        variants = self.mean.shape[1]
        picked = [(int(i), 1 if flipped and variants > 1 else 0) for i, flipped in zip(indices, flips, strict=True)]
        mean = torch.stack([self.mean[i, v] for i, v in picked])
        std = torch.stack([self.std[i, v] for i, v in picked])
        noise = host_randn_rows(mean.shape[1:], gens, dtype=mean.dtype, pin=pin).to(mean.device, non_blocking=True)
        return mean + std * noise


def host_randn_rows(
    shape: Sequence[int], gens: Sequence[torch.Generator], *, dtype: torch.dtype | None = None, pin: bool = False
) -> torch.Tensor:
    """One row of standard normal noise per generator, stacked (``len(gens) x shape``), in one
    buffer (pinned with ``pin``: see ``host_randn``)."""
    import torch

    rows = torch.empty((len(gens), *shape), dtype=dtype or torch.get_default_dtype(), pin_memory=pin)
    for row, gen in zip(rows, gens, strict=True):
        torch.randn(tuple(shape), generator=gen, out=row)
    return rows


def host_randn(
    shape: Sequence[int], gen: torch.Generator, *, dtype: torch.dtype | None = None, pin: bool = False
) -> torch.Tensor:
    """Standard normal noise from a CPU generator: the same numbers on every device.  With
    ``pin`` it lands in pinned (page-locked) memory, which a GPU copies from without the
    host waiting for the GPU; from ordinary memory the copy would first wait for every
    queued kernel to finish."""
    import torch

    return torch.randn(tuple(shape), generator=gen, dtype=dtype, pin_memory=pin)
