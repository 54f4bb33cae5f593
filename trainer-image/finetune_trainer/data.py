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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune_trainer import buckets
from finetune_trainer.buckets import Bucket
from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"
FILEWORDS = "[filewords]"


@dataclass
class Example:
    """One training image, resized to cover its bucket (the training size it is cropped to)."""

    path: Path
    pixels: torch.Tensor  # uint8, 3 x H x W
    prompt: str
    # SHA-256 of the file's bytes: with the prompt (and so the caption), what the dataset
    # fingerprint hashes.
    digest: str = ""
    # (height, width) of the file before resizing: SDXL conditions on it.
    original_size: tuple[int, int] = (0, 0)
    # The size it trains at: the square of the resolution, or its aspect-ratio bucket.
    bucket: Bucket = field(default_factory=lambda: Bucket(0, 0))
    caption: str | None = None  # its own caption, where it has one
    concept: int = 0  # which concept of the job it belongs to
    # Where the loss counts (spec.dataset.masks): uint8, 1 x H x W like ``pixels``, 255 the
    # subject; None: everywhere.
    mask: torch.Tensor | None = None
    mask_digest: str = ""  # SHA-256 of the mask's file, where it has one of its own


@dataclass
class ImageFolder:
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skipped_warning(self, field_name: str) -> str | None:
        if not self.skipped:
            return None
        listed = ", ".join(f"{p.name} ({why})" for p, why in self.skipped[:20])
        more = f" and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
        return f"{field_name}: skipped {len(self.skipped)} file(s) that are not images: {listed}{more}"


def prompt_for(caption: str | None, prompt: str) -> str:
    """The prompt for one image.  A caption file replaces the prompt, unless the prompt holds
    ``[filewords]``, which the caption then fills in (the web UI's convention)."""
    if FILEWORDS in prompt:
        return " ".join(prompt.replace(FILEWORDS, caption or "").split())
    return caption if caption else prompt


def read_image(path: Path) -> Image.Image:
    """An RGB image the right way up: EXIF orientation applied, transparency on white."""
    return _rgb(_oriented(path))


def _oriented(path: Path) -> Image.Image:
    """The image the right way up (EXIF orientation applied), a palette's transparency as alpha."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened) or opened
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image


def _rgb(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _alpha(image: Image.Image) -> Image.Image | None:
    """An image's transparency as a mask (opaque: 255), or None where nothing is transparent."""
    if image.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = image.getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


@dataclass(frozen=True)
class MaskFrom:
    """Where a photo's mask comes from (spec.dataset.masks): a file beside it, or its alpha."""

    file: Path | None = None
    alpha: bool = False


MASKS_FIELD = "spec.dataset.masks"


def _read_mask(path: Path, photo: Path, size: tuple[int, int]) -> Image.Image:
    try:
        mask = _oriented(path)
    except Exception as exc:
        raise BadInput(
            f"{path} (the mask of {photo.name}) is not a readable image ({type(exc).__name__}: {str(exc)[:120]}); "
            "replace it or remove it",
            field=MASKS_FIELD,
        ) from None
    if mask.size != size:
        raise BadInput(
            f"{path} is {mask.width}x{mask.height} but its photo {photo.name} is {size[0]}x{size[1]}; a mask must "
            "be the size of its photo (the same orientation too): export it again at the photo's size",
            field=MASKS_FIELD,
        )
    # A mask with transparency: its alpha is the mask (an editor's cut-out); else its grey levels.
    return _alpha(mask) or mask.convert("L")


def resize_to_cover(image: Image.Image, bucket: Bucket) -> Image.Image:
    from PIL import Image

    height, width = buckets.cover(image.height, image.width, bucket)
    return image if (width, height) == image.size else image.resize((width, height), Image.Resampling.BICUBIC)


def load_image(
    path: Path,
    *,
    prompt: str,
    caption: str | None,
    size_for: Callable[[int, int], Bucket],
    field_name: str,
    concept: int = 0,
    mask: MaskFrom | None = None,
) -> Example:
    """One photo, read, checked and resized to cover its training size (``size_for(height,
    width)``), with its mask where ``mask`` says there is one (resized the same way).  A file
    that is not a readable image is bad input naming the file, and so is a mask whose size is
    not its photo's."""
    import torch

    try:
        oriented = _oriented(path)
        image = _rgb(oriented)
    except Exception as exc:
        raise BadInput(
            f"{path} is not a readable image ({type(exc).__name__}: {str(exc)[:120]}); replace it or remove it",
            field=field_name,
        ) from None
    bucket = size_for(image.height, image.width)
    resized = resize_to_cover(image, bucket)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    mask_image, mask_digest = None, ""
    if mask is not None and mask.file is not None:
        mask_image = _read_mask(mask.file, path, image.size)
        mask_digest = hashlib.sha256(mask.file.read_bytes()).hexdigest()
    elif mask is not None and mask.alpha:
        mask_image = _alpha(oriented)
    mask_pixels = None
    if mask_image is not None:
        covered = resize_to_cover(mask_image, bucket)
        mask_pixels = torch.from_numpy(np.asarray(covered, dtype=np.uint8).copy())[None].contiguous()
    return Example(
        path=path,
        pixels=pixels,
        prompt=prompt_for(caption, prompt),
        digest=hashlib.sha256(path.read_bytes()).hexdigest(),
        original_size=(image.height, image.width),
        bucket=bucket,
        caption=caption,
        concept=concept,
        mask=mask_pixels,
        mask_digest=mask_digest,
    )


def read_caption(path: Path, extension: str = CAPTION_SUFFIX) -> str | None:
    """The caption beside an image (``NAME.txt``, any case of the extension), or None."""
    for candidate in (path.with_suffix(extension), path.with_suffix(extension.upper())):
        if candidate.is_file():
            return candidate.read_text(errors="replace").strip() or None
    return None


def list_folder(
    folder: Path, *, field_name: str, caption_extension: str = CAPTION_SUFFIX
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The images of a folder (not recursive, sorted by name) and what else lies there."""
    if not folder.exists():
        raise BadInput(f"{folder} does not exist", field=field_name)
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder; point it at the folder that holds the images", field=field_name)
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.with_suffix("").name for p in images}
    skipped: list[tuple[Path, str]] = []
    for path in entries:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            continue
        if suffix == caption_extension.lower():
            if path.with_suffix("").name not in stems:
                skipped.append((path, "caption without an image"))
            continue
        if path.name not in ("metadata.jsonl", "DEMO-README.txt"):
            skipped.append((path, "not .jpg, .jpeg, .png or .webp"))
    return images, skipped


def load_folder(
    folder: Path,
    *,
    prompt: str,
    resolution: int,
    field_name: str,
    size_for: Callable[[int, int], Bucket] | None = None,
    caption_extension: str = CAPTION_SUFFIX,
) -> ImageFolder:
    """Every image in ``folder`` (not recursive), sorted by name, with the caption beside it;
    files that are not images are listed in ``skipped`` so that one warning can name them,
    and an image that cannot be read is bad input naming it."""
    images, skipped = list_folder(folder, field_name=field_name, caption_extension=caption_extension)
    sizer = size_for or (lambda height, width: Bucket(resolution, resolution))
    examples = [
        load_image(
            path,
            prompt=prompt,
            caption=read_caption(path, caption_extension),
            size_for=sizer,
            field_name=field_name,
        )
        for path in images
    ]
    result = ImageFolder(examples=examples, skipped=skipped)
    if not examples:
        why = f" ({result.skipped_warning(field_name)})" if skipped else ""
        raise BadInput(
            f"{folder} holds no images (looked for .jpg, .jpeg, .png, .webp){why}; add photos of the subject to "
            "the folder",
            field=field_name,
        )
    return result


def dataset_fingerprint(*groups: Sequence[Example]) -> str:
    """What the run learns from, as a short hash: each image's file name, content hash and
    prompt (its caption included), per group (instance images, class images)."""
    listing = [[[e.path.name, e.digest, e.prompt, *([e.mask_digest] if e.mask_digest else [])] for e in group]
               for group in groups]  # fmt: skip
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
# The held-out photos' fixed noise and timesteps (spec.evaluation.holdOut).
STREAM_HOLD_OUT = 8


@dataclass(frozen=True)
class ExampleOrder:
    """Which example every *slot* of the run holds.

    The run is a sequence of slots, one per example seen, counted over the whole run and every
    process: optimizer step ``s``, micro-batch ``m`` of it and process ``p`` hold the slots
    ``(s * accumulation + m) * global_batch + p * batch_size + j``.  An epoch is every example
    ``repeats`` times, in an order seeded by (seed, epoch); each slot's random draws (flip,
    crop, noise, timestep) come from a generator of its own.  So a batch of 2 on one process
    and a batch of 1 on each of two processes see the same examples with the same noise, and a
    resumed run sees what the uninterrupted one would.

    With aspect-ratio buckets (``groups``: each example's bucket) the epoch is laid out in runs
    of ``group_size`` slots from one bucket (a process's share of a micro-batch is one tensor),
    a bucket's last run filled up with its own first examples, and the runs shuffled.
    """

    num_examples: int
    seed: int
    stream: int = STREAM_ORDER
    repeats: tuple[int, ...] | None = None
    groups: tuple[int, ...] | None = None
    group_size: int = 1

    def epoch_order(self, epoch: int) -> list[int]:
        return _epoch_order(self, epoch)

    @property
    def per_epoch(self) -> int:
        return len(self.epoch_order(0))

    def example(self, slot: int) -> int:
        epoch, position = divmod(slot, self.per_epoch)
        return self.epoch_order(epoch)[position]

    def examples(self, slots: Sequence[int]) -> list[int]:
        return [self.example(k) for k in slots]


@functools.lru_cache(maxsize=64)
def _epoch_order(order: ExampleOrder, epoch: int) -> list[int]:
    import torch

    repeats = order.repeats or (1,) * order.num_examples
    expanded = [i for i in range(order.num_examples) for _ in range(repeats[i])]
    permutation = torch.randperm(len(expanded), generator=generator(order.seed, order.stream, epoch)).tolist()
    ordered = [expanded[j] for j in permutation]
    if order.groups is None:
        return ordered
    by_group: dict[int, list[int]] = {}
    for index in ordered:
        by_group.setdefault(order.groups[index], []).append(index)
    runs: list[list[int]] = []
    size = order.group_size
    for group in sorted(by_group):
        members = by_group[group]
        for start in range(0, len(members), size):
            run = members[start : start + size]
            run += [members[k % len(members)] for k in range(size - len(run))]
            runs.append(run)
    shuffled = torch.randperm(len(runs), generator=generator(order.seed, order.stream, epoch, 1)).tolist()
    return [index for r in shuffled for index in runs[r]]


def slots_of(micro_batch: int, *, batch_size: int, num_processes: int, process_index: int) -> list[int]:
    """The slots one process trains on in one micro-batch of the run."""
    first = micro_batch * batch_size * num_processes + process_index * batch_size
    return list(range(first, first + batch_size))


def crop_and_flip(
    pixels: torch.Tensor, size: int | Bucket, *, center: bool, flip: bool, gen: torch.Generator | None = None
) -> torch.Tensor:
    """A crop of ``size`` (a square side, or a bucket) of the image as floats in [-1, 1]."""
    return crop_at(pixels, size, center=center, flip=flip, gen=gen)[0]


def crop_at(
    pixels: torch.Tensor, size: int | Bucket, *, center: bool, flip: bool, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A crop of ``size`` of the image as floats in [-1, 1], and where its top-left corner lies
    in the (flipped, where flipped) resized image: SDXL conditions on it.  The image must cover
    ``size`` (see ``fit``)."""
    import torch

    bucket = size if isinstance(size, Bucket) else Bucket(size, size)
    _, height, width = pixels.shape
    if center:
        top, left = (height - bucket.height) // 2, (width - bucket.width) // 2
    else:
        top = int(torch.randint(0, height - bucket.height + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - bucket.width + 1, (1,), generator=gen))
    crop = pixels[:, top : top + bucket.height, left : left + bucket.width]
    if flip:
        crop = crop.flip(-1)
    return crop.float() / 127.5 - 1.0, (top, flipped_left(left, width, bucket.width) if flip else left)


def mask_weights(
    masks: Sequence[torch.Tensor | None],
    bucket: Bucket,
    crops: Sequence[tuple[int, int]],
    flips: Sequence[bool],
    *,
    size: tuple[int, int],
    background: float,
) -> torch.Tensor:
    """Each example's loss weights (``len(masks)`` x 1 x ``size``, the latents' height and
    width): its mask cropped and flipped as its pixels were (``crops``: the corner in the
    flipped image, as ``crop_at`` and the latent cache give it), averaged over each latent's
    pixels, and lifted to ``background`` where it is black.  An example without a mask weighs
    1 everywhere."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    rows = []
    for mask, (top, left), flipped in zip(masks, crops, flips, strict=True):
        if mask is None:
            rows.append(torch.ones((1, *size)))
            continue
        covered = fit(mask, bucket)
        if flipped:
            covered = covered.flip(-1)
        window = covered[:, top : top + bucket.height, left : left + bucket.width].float() / 255.0
        rows.append(F.interpolate(window[None], size=size, mode="area")[0])
    weights = torch.stack(rows)
    return background + (1.0 - background) * weights if background else weights


def fit(pixels: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """An image's pixels resized to cover another bucket (a class image beside a photo of
    another shape); unchanged where they already cover it exactly."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    _, height, width = pixels.shape
    target = buckets.cover(height, width, bucket)
    if target == (height, width):
        return pixels
    resized = F.interpolate(pixels[None].float(), size=target, mode="bicubic", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def flipped_left(left: int, width: int, crop_width: int) -> int:
    """The left edge of a crop once the image is mirrored (as diffusers' SDXL script records it,
    flipping first and cropping after)."""
    return width - left - crop_width


# --- latent cache -------------------------------------------------------------------------------


class LatentCache:
    """The VAE's latent distribution (mean, std) of each (example, size, flip), computed once.

    Sampling from the cached distribution each step is exactly what encoding each step does,
    without the encoder.  With random flips both orientations are cached.  A random crop is
    drawn once per example and size here, from a generator of its own (so it does not depend
    on when it is computed); the trainer warns where that differs from cropping each epoch.
    Entries are made up front for the sizes known then, and on first use for the others (a
    class image beside a photo of another bucket).
    """

    def __init__(
        self,
        vae: Any,
        examples: Sequence[Example],
        *,
        center_crop: bool,
        random_flip: bool,
        seed: int,
        stream: int,
        device: Any,
        dtype: torch.dtype,
        batch_size: int = 8,
    ) -> None:
        self.vae = vae
        # Examples encoded in one VAE pass (each with its flipped twin): sized by the caller
        # from the resolution and the free memory (``job.caching_batch``).
        self.batch_size = max(1, batch_size)
        self.examples = examples
        self.center_crop = center_crop
        self.variants = (False, True) if random_flip else (False,)
        self.seed = seed
        self.stream = stream
        self.device = device
        self.dtype = dtype
        # (example, bucket) -> (mean, std: variants x C x h x w, crops: (top, left) per variant)
        self.entries: dict[tuple[int, Bucket], tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]] = {}

    def fill(self, keys: Sequence[tuple[int, Bucket]]) -> None:
        """Encode what is missing of ``keys``, a batch of one size at a time."""
        import torch

        batch_size = self.batch_size
        missing = sorted({k for k in keys if k not in self.entries}, key=lambda k: (k[1], k[0]))
        by_size: dict[Bucket, list[int]] = {}
        for index, bucket in missing:
            by_size.setdefault(bucket, []).append(index)
        with torch.no_grad():
            for bucket, indices in by_size.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    pixels, crops = [], []
                    for index in chunk:
                        gen = generator(self.seed, STREAM_CACHE, self.stream, index, bucket.height, bucket.width)
                        source = fit(self.examples[index].pixels, bucket)
                        base, (top, left) = crop_at(source, bucket, center=self.center_crop, flip=False, gen=gen)
                        pixels += [base.flip(-1) if flipped else base for flipped in self.variants]
                        width = source.shape[2]
                        crops.append(
                            [(top, flipped_left(left, width, bucket.width) if f else left) for f in self.variants]
                        )
                    dist = self.vae.encode(torch.stack(pixels).to(device=self.device, dtype=self.dtype)).latent_dist
                    shape = (len(chunk), len(self.variants), *dist.mean.shape[1:])
                    means, stds = dist.mean.float().reshape(shape), dist.std.float().reshape(shape)
                    for offset, index in enumerate(chunk):
                        self.entries[(index, bucket)] = (means[offset], stds[offset], crops[offset])

    def crop(self, index: int, bucket: Bucket, flipped: bool) -> tuple[int, int]:
        crops = self.entries[(index, bucket)][2]
        return crops[1 if flipped and len(crops) > 1 else 0]

    def sample(
        self,
        indices: Sequence[int],
        bucket: Bucket,
        flips: Sequence[bool],
        gens: Sequence[torch.Generator],
        *,
        pin: bool = False,
    ) -> torch.Tensor:
        """Latents of the examples at ``indices`` at size ``bucket`` (flipped where asked), on
        the cache's device, each sampled with the noise of its own generator.

        Each example is picked with plain integers (a view: no index tensor travels to the
        GPU), and the noise comes from seeded CPU generators (``pin``: into pinned memory, for
        a copy to the GPU that does not wait for it)."""
        import torch

        self.fill([(int(i), bucket) for i in indices])
        picked = []
        for i, flipped in zip(indices, flips, strict=True):
            mean, std, _ = self.entries[(int(i), bucket)]
            variant = 1 if flipped and len(self.variants) > 1 else 0
            picked.append((mean[variant], std[variant]))
        mean = torch.stack([m for m, _ in picked])
        std = torch.stack([s for _, s in picked])
        noise = host_randn_rows(mean.shape[1:], gens, dtype=mean.dtype, pin=pin).to(mean.device, non_blocking=True)
        return mean + std * noise


def host_randn_rows(
    shape: Sequence[int], gens: Sequence[torch.Generator], *, dtype: torch.dtype | None = None, pin: bool = False
) -> torch.Tensor:
    """One row of standard normal noise per generator, stacked (``len(gens) x shape``), in one
    buffer: the same numbers on every device, since the generators are the CPU's.  With ``pin``
    the buffer is pinned (page-locked) memory, which a GPU copies from without the host waiting
    for the GPU; from ordinary memory the copy would first wait for every queued kernel."""
    import torch

    rows = torch.empty((len(gens), *shape), dtype=dtype or torch.get_default_dtype(), pin_memory=pin)
    for row, gen in zip(rows, gens, strict=True):
        torch.randn(tuple(shape), generator=gen, out=row)
    return rows
