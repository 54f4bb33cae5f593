"""Datasets as people keep them, read into concepts: each a set of photos with their prompts,
how often each counts per epoch, and (for prior preservation) a class prompt and class images.

Layouts (``spec.dataset.layout``; ``auto`` detects them, and what was found is reported):

- ``folder``: photos, each with an optional caption beside it (``NAME.txt``, or
  ``captionExtension``), the web UIs' and ai-toolkit's layout.  A caption replaces the instance
  prompt for its photo, or fills ``[filewords]`` in it.
- ``kohya``: kohya's DreamBooth folders, subfolders named ``<repeats>_<token> <class>`` (say
  ``10_zqx toy``), each a concept whose prompt is the name after the repeats (captions beside
  photos win, as in kohya's scripts); regularisation images in ``<repeats>_<class>`` folders
  under ``classImages`` (or a ``reg/`` beside an ``img/`` folder, kohya_ss's layout), each
  paired with the concepts whose name ends in its class.
- ``imagefolder``: Hugging Face's ImageFolder, photos (in subfolders too) and a
  ``metadata.jsonl`` of ``{"file_name": ..., "<captionColumn>": ...}`` rows.
- ``concepts:``: several subjects in one job, each a folder (or imagefolder) of its own.

Checked before training, naming the file: an image that cannot be read, a photo without a
caption where ``requireCaptions`` is set, a metadata row whose file is missing, a kohya folder
name without its repeats (bad input); photos much smaller than their training size and
duplicate photos (warnings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from finetune_api.v1alpha1 import (
    BucketFound,
    ConceptFound,
    DatasetLayout,
    DatasetStatus,
    FineTuneJobSpec,
    MaskSource,
)
from finetune_trainer import data
from finetune_trainer.buckets import Bucket
from finetune_trainer.errors import BadInput

FIELD = "spec.dataset.instanceImages"
METADATA = "metadata.jsonl"
TRIGGER = "[trigger]"
DEFAULT_MASK_FOLDER = "masks"
_KOHYA_NAME = re.compile(r"(\d+)_(.+)")
# Photos with a shorter side under this share of their training size's are upscaled a lot.
SMALL = 0.5


@dataclass
class Concept:
    name: str
    prompt: str | None  # the instance prompt, where a photo has no caption of its own
    repeats: int = 1
    class_prompt: str | None = None
    class_images: Path | str | None = None  # a local folder (kohya's), or the spec's URI
    class_field: str = "spec.dataset.classImages"
    examples: list[data.Example] = field(default_factory=list)
    class_examples: list[data.Example] = field(default_factory=list)


@dataclass
class Found:
    layout: str
    concepts: list[Concept]
    warnings: list[str] = field(default_factory=list)

    @property
    def examples(self) -> list[data.Example]:
        return [e for c in self.concepts for e in c.examples]

    @property
    def repeats(self) -> list[int]:
        return [c.repeats for c in self.concepts for _ in c.examples]

    def status(self) -> DatasetStatus:
        examples = self.examples
        sizes: dict[Bucket, int] = {}
        for example in examples:
            sizes[example.bucket] = sizes.get(example.bucket, 0) + 1
        captioned = sum(1 for e in examples if e.caption)
        return DatasetStatus(
            layout=self.layout,
            images=len(examples),
            concepts=[
                ConceptFound(
                    name=c.name,
                    images=len(c.examples),
                    repeats=c.repeats,
                    captioned=sum(1 for e in c.examples if e.caption),
                    class_images=len(c.class_examples),
                    prompt=c.prompt or "",
                )
                for c in self.concepts[:64]
            ],
            buckets=[BucketFound(width=b.width, height=b.height, images=n) for b, n in sorted(sizes.items())][:128],
            caption_coverage=round(100 * captioned / len(examples), 1) if examples else 0,
            masked=sum(1 for e in examples if e.mask is not None) or None,
        )

    def describe(self) -> str:
        """One line for the log and the progress message."""
        parts = [f"{c.name}: {len(c.examples)} photos x{c.repeats}" for c in self.concepts[:8]]
        more = f" and {len(self.concepts) - 8} more" if len(self.concepts) > 8 else ""
        sizes = sorted({e.bucket for e in self.examples})
        shapes = ", ".join(str(b) for b in sizes[:6]) + (" ..." if len(sizes) > 6 else "")
        masked = sum(1 for e in self.examples if e.mask is not None)
        masks = f"; {masked} with a mask" if masked else ""
        return f"dataset ({self.layout}): {'; '.join(parts)}{more}; training sizes {shapes}{masks}"


Fetch = Callable[[str, str], Path]
SizeFor = Callable[[int, int], Bucket]


def read(spec: FineTuneJobSpec, *, fetch: Fetch, size_for: SizeFor) -> Found:
    """The concepts of ``spec.dataset``, their photos read and checked (class images come later:
    some are generated with the base model)."""
    dataset = spec.dataset
    if dataset.concepts is not None:
        concepts = []
        for index, asked in enumerate(dataset.concepts):
            where = f"spec.dataset.concepts[{index}].images"
            folder = fetch(asked.images, where)
            layout = DatasetLayout.IMAGEFOLDER if (folder / METADATA).is_file() else DatasetLayout.FOLDER
            found = Concept(
                name=asked.instance_prompt,
                prompt=asked.instance_prompt,
                repeats=asked.repeats,
                class_prompt=asked.class_prompt,
                class_images=asked.class_images,
                class_field=f"spec.dataset.concepts[{index}].classImages",
            )
            found.examples = _read_photos(folder, spec, layout=layout, prompt=found.prompt, field_name=where,
                                          size_for=size_for, concept=index)  # fmt: skip
            concepts.append(found)
        result = Found(layout="concepts", concepts=concepts)
    else:
        assert dataset.instance_images is not None  # the model validator requires one of the two
        folder = fetch(dataset.instance_images, FIELD)
        layout = DatasetLayout(dataset.layout)
        if layout == DatasetLayout.AUTO:
            layout = detect(folder)
        if layout == DatasetLayout.KOHYA:
            result = _read_kohya(folder, spec, fetch=fetch, size_for=size_for)
        else:
            concept = Concept(
                name=folder.name or "photos",
                prompt=dataset.instance_prompt,
                class_prompt=dataset.class_prompt,
                class_images=dataset.class_images,
            )
            concept.examples = _read_photos(folder, spec, layout=layout, prompt=concept.prompt, field_name=FIELD,
                                            size_for=size_for, concept=0)  # fmt: skip
            result = Found(layout=str(layout), concepts=[concept])
    result.warnings += _check(result, spec)
    return result


def detect(folder: Path) -> DatasetLayout:
    if (folder / METADATA).is_file():
        return DatasetLayout.IMAGEFOLDER
    if folder.is_dir():
        images, _ = data.list_folder(folder, field_name=FIELD)
        subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not images and (any(_KOHYA_NAME.fullmatch(p.name) for p in subfolders) or (folder / "img").is_dir()):
            return DatasetLayout.KOHYA
    return DatasetLayout.FOLDER


def _caption(raw: str | None, spec: FineTuneJobSpec) -> str | None:
    """A caption with the trigger word put in (ai-toolkit's ``[trigger]``, else in front)."""
    trigger = spec.dataset.trigger_word
    if raw is None or not trigger:
        return raw
    if TRIGGER in raw:
        return raw.replace(TRIGGER, trigger)
    return raw if trigger in raw else f"{trigger}, {raw}"


def _read_photos(
    folder: Path,
    spec: FineTuneJobSpec,
    *,
    layout: DatasetLayout,
    prompt: str | None,
    field_name: str,
    size_for: SizeFor,
    concept: int,
) -> list[data.Example]:
    dataset = spec.dataset
    if layout == DatasetLayout.IMAGEFOLDER:
        pairs = _imagefolder(folder, column=dataset.caption_column, field_name=field_name, masks=mask_folder(spec))
    else:
        images, _ = data.list_folder(folder, field_name=field_name, caption_extension=dataset.caption_extension)
        pairs = [(p, data.read_caption(p, dataset.caption_extension)) for p in images]
    if not pairs:
        raise BadInput(
            f"{folder} holds no images (looked for .jpg, .jpeg, .png, .webp); add photos of the subject to the folder",
            field=field_name,
        )
    missing = [p for p, caption in pairs if not caption]
    masks = [_mask_of(path, spec) for path, _ in pairs]
    if missing and (dataset.require_captions or prompt is None):
        names = ", ".join(p.name for p in missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        why = "spec.dataset.requireCaptions is set" if dataset.require_captions else "there is no instance prompt"
        raise BadInput(
            f"{len(missing)} photo(s) have no caption and {why}: {names} (in {folder}); write a "
            f"{dataset.caption_extension} beside each or a {METADATA} row for it",
            field=field_name,
        )
    return [
        data.load_image(
            path,
            prompt=prompt or "",
            caption=_caption(caption, spec),
            size_for=size_for,
            field_name=field_name,
            concept=concept,
            mask=mask,
        )
        for (path, caption), mask in zip(pairs, masks, strict=True)
    ]


def mask_folder(spec: FineTuneJobSpec) -> str | None:
    """The name of the masks' folder inside each folder of photos, with masks from files."""
    masks = spec.dataset.masks
    if masks is None or masks.source != MaskSource.FOLDER:
        return None
    return masks.folder or DEFAULT_MASK_FOLDER


def _mask_of(photo: Path, spec: FineTuneJobSpec) -> data.MaskFrom | None:
    """Where ``photo``'s mask comes from: the same name (any image extension) in the masks'
    folder beside it, or its own alpha; None where the job has no masks or the file is missing."""
    masks = spec.dataset.masks
    if masks is None:
        return None
    if masks.source == MaskSource.ALPHA:
        return data.MaskFrom(alpha=True)
    folder = photo.parent / (mask_folder(spec) or DEFAULT_MASK_FOLDER)
    for suffix in data.IMAGE_SUFFIXES:
        for candidate in (folder / (photo.stem + suffix), folder / (photo.stem + suffix.upper())):
            if candidate.is_file():
                return data.MaskFrom(file=candidate)
    return None


def _imagefolder(
    folder: Path, *, column: str, field_name: str, masks: str | None = None
) -> list[tuple[Path, str | None]]:
    """(photo, caption) from a metadata.jsonl; photos it does not list have no caption.  Images
    in a folder named ``masks`` (the masks' folder) are masks, not photos."""
    captions: dict[Path, str | None] = {}
    for number, line in enumerate((folder / METADATA).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (ValueError, KeyError, TypeError):
            raise BadInput(
                f"{folder / METADATA} line {number} is not a JSON object with a file_name", field=field_name
            ) from None
        path = (folder / str(name)).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise BadInput(
                f"{folder / METADATA} line {number} names {name}, which is not in {folder}; "
                "fix the row or add the file",
                field=field_name,
            )
        text = row.get(column)
        captions[path] = str(text).strip() or None if text is not None else None
    # Every image under the folder trains, as in Hugging Face's ImageFolder; those no row names
    # have no caption of their own.
    for image in folder.rglob("*"):
        if image.is_file() and image.suffix.lower() in data.IMAGE_SUFFIXES and not image.name.startswith("."):
            if masks is not None and masks in image.relative_to(folder).parts[:-1]:
                continue
            captions.setdefault(image.resolve(), None)
    return sorted(captions.items())


def _read_kohya(folder: Path, spec: FineTuneJobSpec, *, fetch: Fetch, size_for: SizeFor) -> Found:
    dataset = spec.dataset
    root = folder / "img" if (folder / "img").is_dir() else folder
    concepts: list[Concept] = []
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for index, sub in enumerate(subfolders):
        match = _KOHYA_NAME.fullmatch(sub.name)
        if not match or int(match[1]) < 1:
            raise BadInput(
                f"{sub}: a kohya folder is named '<repeats>_<token> <class>' (e.g. '10_zqx toy'); rename it, or "
                "set spec.dataset.layout to folder",
                field=FIELD,
            )
        concept = Concept(name=sub.name, prompt=match[2].strip(), repeats=int(match[1]))
        concept.examples = _read_photos(sub, spec, layout=DatasetLayout.FOLDER, prompt=concept.prompt,
                                        field_name=FIELD, size_for=size_for, concept=index)  # fmt: skip
        concepts.append(concept)
    if not concepts:
        raise BadInput(f"{root} holds no '<repeats>_<token> <class>' folders (kohya's layout)", field=FIELD)
    warnings: list[str] = []
    if dataset.instance_prompt:
        warnings.append(
            f"spec.dataset.instancePrompt: with the kohya layout each folder's name is its prompt "
            f"({', '.join(repr(c.prompt) for c in concepts[:4])}); the instance prompt is not used"
        )
    regularisation = _kohya_regularisation(folder, spec, fetch=fetch)
    for concept in concepts:
        if regularisation:
            # A regularisation folder belongs to the concepts whose name ends in its class.
            matched = [(c, p) for c, p in regularisation if concept.prompt and concept.prompt.endswith(c)]
            chosen = matched[0] if matched else regularisation[0]
            concept.class_prompt, concept.class_images = chosen
        else:
            concept.class_prompt = dataset.class_prompt
            concept.class_images = dataset.class_images
    return Found(layout="kohya", concepts=concepts, warnings=warnings)


def _kohya_regularisation(folder: Path, spec: FineTuneJobSpec, *, fetch: Fetch) -> list[tuple[str, Path]]:
    """(class, folder) of each '<repeats>_<class>' regularisation folder."""
    roots: list[Path] = []
    if spec.dataset.class_images is not None:
        roots.append(fetch(spec.dataset.class_images, "spec.dataset.classImages"))
    elif (folder / "reg").is_dir():
        roots.append(folder / "reg")
    found: list[tuple[str, Path]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            match = _KOHYA_NAME.fullmatch(sub.name)
            if not match:
                raise BadInput(
                    f"{sub}: a kohya regularisation folder is named '<repeats>_<class>' (e.g. '1_toy'); rename it",
                    field="spec.dataset.classImages",
                )
            found.append((match[2].strip(), sub))
    return found


def _check(found: Found, spec: FineTuneJobSpec) -> list[str]:
    """Warnings naming photos much smaller than their training size, duplicates, and photos
    without a mask in a job with masks (bad input where none has one)."""
    warnings: list[str] = []
    if spec.dataset.masks is not None:
        bare = [e.path.name for e in found.examples if e.mask is None]
        if spec.dataset.masks.source == MaskSource.ALPHA:
            where = "nothing in them is transparent (their alpha channel is the mask)"
        else:
            where = f"no image of the same name in a '{mask_folder(spec)}' folder beside them"
        listed = ", ".join(bare[:10]) + (f" and {len(bare) - 10} more" if len(bare) > 10 else "")
        if bare and len(bare) == len(found.examples):
            raise BadInput(
                f"no photo has a mask ({where}): {listed}; add the masks, or remove spec.dataset.masks",
                field=data.MASKS_FIELD,
            )
        if bare:
            warnings.append(
                f"{data.MASKS_FIELD}: {len(bare)} photo(s) have no mask and train on the whole picture ({where}): "
                f"{listed}"
            )
    small = [e.path.name for e in found.examples if min(e.original_size) < SMALL * min(e.bucket.height, e.bucket.width)]
    if small:
        listed = ", ".join(small[:10]) + (f" and {len(small) - 10} more" if len(small) > 10 else "")
        warnings.append(
            f"spec.dataset: {len(small)} photo(s) are less than half their training size and are upscaled "
            f"(blurry): {listed}; use larger photos or a smaller spec.dataset.resolution"
        )
    seen: dict[str, Path] = {}
    duplicates: list[str] = []
    for example in found.examples:
        if example.digest in seen:
            duplicates.append(f"{example.path.name} = {seen[example.digest].name}")
        else:
            seen[example.digest] = example.path
    if duplicates:
        warnings.append(
            f"spec.dataset: {len(duplicates)} photo(s) are duplicates (the same file twice, so seen twice as often): "
            + ", ".join(duplicates[:10])
        )
    return warnings
