"""Preview samples: ``spec.samples.prompts`` rendered with the weights being trained, every
``samples.everySteps`` steps and at the end, to ``<output>/samples/step-000200-0.png``.

Every sample of a prompt starts from the same noise (``samples.seed``), so a column of the
contact sheet shows what training changed and nothing else.  Rendering costs
``numInferenceSteps`` UNet passes per prompt (twice that with guidance) on the main process;
the other processes of a multi-GPU run wait for it.  A sample that fails to render is a
warning, never a failed job.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.report import Thumbnail
from finetune_api.v1alpha1 import Samples
from finetune_trainer import storage
from finetune_trainer.families import BaseModel

log = logging.getLogger("finetune_trainer")

SAMPLES_DIR = "samples"
_NAME = re.compile(r"step-(\d{6,})-(\d+)\.png")
# Thumbnails travel in every progress event: small JPEGs of the newest step's samples.
THUMBNAIL_PX = 128
THUMBNAIL_BUDGET_BYTES = 96 * 1024  # base64 of all thumbnails of one event together
_QUALITIES = (80, 65, 50, 35)


def sample_name(step: int, index: int) -> str:
    return f"step-{step:06d}-{index}.png"


def existing(folder: Path) -> dict[int, dict[int, Path]]:
    """``{step: {prompt index: path}}`` of the complete samples in ``folder``."""
    found: dict[int, dict[int, Path]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if match := _NAME.fullmatch(path.name):
            found.setdefault(int(match[1]), {})[int(match[2])] = path
    return dict(sorted(found.items()))


def all_samples(folder: Path) -> list[Path]:
    """Every sample, oldest step first, prompts in order."""
    return [path for row in existing(folder).values() for _, path in sorted(row.items())]


@dataclass
class Rendered:
    step: int
    paths: list[Path]
    failures: list[str]


class SampleRenderer:
    """Renders the job's sample prompts with the models as they are now."""

    def __init__(
        self,
        spec: Samples,
        *,
        resolution: int,
        base: BaseModel,
        folder: Path,
        device: Any,
        dtype: Any,
        prompt_inputs: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self.spec = spec
        self.resolution = resolution
        self.base = base
        self.folder = folder
        self.device = device
        self.dtype = dtype
        # A family whose text encoders have left the GPU renders from the prompts' embeddings.
        self.prompt_inputs = prompt_inputs

    @property
    def guidance_scale(self) -> float:
        """The spec's, else the family's (7.5 classifier-free; Flux.1 dev's distilled 3.5)."""
        if self.spec.guidance_scale is not None:
            return self.spec.guidance_scale
        return self.base.family.sample_guidance

    @property
    def enabled(self) -> bool:
        return bool(self.spec.prompts)

    def due(self, step: int, total: int) -> bool:
        every = self.spec.every_steps
        return self.enabled and (step == total or bool(every and step % every == 0))

    def done(self, step: int) -> bool:
        row = existing(self.folder).get(step, {})
        return all(index in row for index in range(len(self.spec.prompts)))

    def render(self, step: int, *, unet: Any, text_encoders: list[Any]) -> Rendered:
        """One PNG per prompt for ``step`` (those already there are kept: the weights at a
        step are the same in a resumed run)."""
        import torch

        pipeline: Any = self.base.family.pipeline(base=self.base, unet=unet, text_encoders=text_encoders)
        pipeline.set_progress_bar_config(disable=True)
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.dtype != torch.float32:
            autocast = torch.autocast(torch.device(self.device).type, dtype=self.dtype)
        modes = [(m, m.training) for m in (unet, *text_encoders) if m is not None]
        row = existing(self.folder).get(step, {})
        paths: list[Path] = []
        failures: list[str] = []
        try:
            for module, _ in modes:
                module.eval()
            for index, prompt in enumerate(self.spec.prompts):
                dest = self.folder / sample_name(step, index)
                if index in row:
                    paths.append(dest)
                    continue
                try:
                    generator = torch.Generator(device=self.device).manual_seed(self.spec.seed)
                    inputs: dict[str, Any] = {
                        "prompt": prompt,
                        "negative_prompt": self.spec.negative_prompt or None,
                    }
                    if self.prompt_inputs is not None:
                        inputs = self.prompt_inputs(prompt)
                    with torch.no_grad(), autocast, decode_outside_autocast(pipeline.vae):
                        image = pipeline(
                            **inputs,
                            height=self.resolution,
                            width=self.resolution,
                            num_inference_steps=self.spec.num_inference_steps,
                            guidance_scale=self.guidance_scale,
                            generator=generator,
                            **self.base.family.sample_options(self.base),
                        ).images[0]
                    self._save(image, dest, prompt=prompt, step=step)
                    paths.append(dest)
                except Exception as exc:  # a preview is never worth the run
                    failures.append(f"prompt {index} ({prompt[:60]!r}): {type(exc).__name__}: {exc}"[:400])
                    log.warning(
                        f"sample {index} at step {step} could not be rendered: {type(exc).__name__}: {exc}",
                        extra={"event": "sample-failed"},
                    )
                    if isinstance(exc, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
        finally:
            for module, training in modes:
                module.train(training)
        return Rendered(step=step, paths=paths, failures=failures)

    def _save(self, image: Any, dest: Path, *, prompt: str, step: int) -> None:
        from PIL.PngImagePlugin import PngInfo

        spec = self.spec
        info = PngInfo()
        # The web UIs' "parameters" text, so a sample dropped into one shows how it was made.
        negative = f"\nNegative prompt: {spec.negative_prompt}" if spec.negative_prompt else ""
        info.add_text(
            "parameters",
            f"{prompt}{negative}\nSteps: {spec.num_inference_steps}, CFG scale: {self.guidance_scale}, "
            f"Seed: {spec.seed}, Size: {self.resolution}x{self.resolution}, Training step: {step}",
        )
        with storage.atomic_path(dest) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        storage.make_readable(dest)


@contextlib.contextmanager
def decode_outside_autocast(vae: Any) -> Any:
    """While inside: the VAE decodes in its own precision, with autocast off.  The pipeline
    runs the denoiser under autocast (the run's fp16/bf16), and autocast would decode in it too:
    a VAE kept in fp32 because it overflows in fp16 (SDXL's) then overflows anyway, and the
    pictures come out black (NaN).  Its input latents are cast to the VAE's dtype."""
    import torch

    had = "decode" in vars(vae)
    original = vae.decode

    def decode(latents: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(latents.device.type, enabled=False):
            return original(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = decode
    try:
        yield vae
    finally:
        if had:
            vae.decode = original
        else:
            del vae.decode


def thumbnails(folder: Path, prompts: list[str], *, budget: int = THUMBNAIL_BUDGET_BYTES) -> list[Thumbnail]:
    """JPEGs of at most ``THUMBNAIL_PX`` pixels a side of the newest step's samples, their base64
    adding up to at most ``budget`` bytes (quality, then size, goes down until they fit)."""
    rows = existing(folder)
    if not rows:
        return []
    step = max(rows)
    row = sorted(rows[step].items())[:16]
    share = budget // max(1, len(row))
    result: list[Thumbnail] = []
    for index, path in row:
        encoded = _thumbnail_base64(path, share)
        if encoded is None:
            continue
        prompt = prompts[index] if index < len(prompts) else ""
        result.append(Thumbnail(name=path.name, step=step, prompt=prompt[:200], jpeg_base64=encoded))
    return result


def _thumbnail_base64(path: Path, limit: int) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except OSError:
        return None
    for size in (THUMBNAIL_PX, THUMBNAIL_PX * 3 // 4, THUMBNAIL_PX // 2):
        small = image.copy()
        small.thumbnail((size, size))
        for quality in _QUALITIES:
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=quality, optimize=True)
            encoded = base64.b64encode(buffer.getvalue()).decode()
            if len(encoded) <= min(limit, 48 * 1024):
                return encoded
    return None
