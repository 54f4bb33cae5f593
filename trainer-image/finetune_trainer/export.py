"""The trained model, as people use it: a diffusers folder, one ``.safetensors`` in the
original SD layout (what the web UIs load), for LoRA the adapter files (see lora.py), and
``manifest.json`` listing every exported file with its size and SHA-256.

Each export is written under a temporary name and renamed into place when complete; the
manifest is written last, so a manifest on disk means the exports it lists are whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.v1alpha1 import FineTuneJob, Method, ModelType, OutputFile, OutputFormat
from finetune_trainer import convert, lora, model_card, original_config, storage
from finetune_trainer.model import CONFIG_METADATA_KEY, BaseModel
from finetune_trainer.report import now_rfc3339

log = logging.getLogger("finetune_trainer")

DIFFUSERS_DIR = "diffusers"
MANIFEST = "manifest.json"
# The "modelspec" architecture names that model browsers and web UIs read from the header.
_ARCHITECTURES = {
    ModelType.V1X: "stable-diffusion-v1",
    ModelType.V2X_512: "stable-diffusion-v2-512",
    ModelType.V2X: "stable-diffusion-v2-768-v",
}


@dataclass
class Trained:
    """The models as training left them, and where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    base: BaseModel
    # Method LoRA: whether the text encoder carries adapters too.
    text_encoder_adapters: bool = False


def single_file_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name or 'model'}.safetensors"


def lora_file_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name or 'model'}-lora.safetensors"


def export_all(
    trained: Trained,
    output: Path,
    *,
    job: FineTuneJob,
    step: int,
    settings: dict[str, str],
    pictures: Sequence[Path] = (),
    samples: Sequence[Path] = (),
) -> list[OutputFile]:
    """Write every requested format and the manifest; return the files for the report.

    ``pictures`` (loss.png, samples.png) are listed with the exports; ``samples`` are named in
    the manifest."""
    import torch

    spec = job.spec
    dtype = torch.float16 if spec.output.half_precision else torch.float32
    written: list[Path] = []
    full_model = True
    if spec.method == Method.LORA:
        text_encoder = trained.text_encoder if trained.text_encoder_adapters else None
        written.append(lora.export_diffusers(trained.unet, text_encoder, output / lora.LORA_DIR, dtype=dtype))
        written.append(
            lora.export_kohya(
                trained.unet,
                text_encoder,
                output / lora_file_name(job),
                settings=spec.lora,
                model_type=str(trained.base.model_type),
                title=job.metadata.name or "model",
                step=step,
                dtype=dtype,
            )
        )
        full_model = spec.output.merge_lora
        if full_model:
            lora.merge(trained.unet, text_encoder)
    if full_model:
        # Training is over (its final state is in the last checkpoint), so the models are cast
        # in place rather than copied: a copy of an SD UNet would cost gigabytes.
        for module in (trained.unet, trained.vae, trained.text_encoder):
            module.to(dtype)
        formats = set(spec.output.formats)
        if OutputFormat.DIFFUSERS in formats:
            written.append(export_diffusers(trained, output / DIFFUSERS_DIR))
        if OutputFormat.SAFETENSORS in formats:
            single = export_single_file(trained, output / single_file_name(job), title=job.metadata.name, step=step)
            written.append(single)
            if trained.base.model_type != ModelType.V1X:
                # The web UIs read an SD 2.x file's architecture (and v-prediction) from this.
                written.append(export_original_config(trained, single.with_suffix(".yaml")))
    written += [p for p in pictures if p.is_file()]
    files = list_files(output, written)
    card = model_card.render(job, step=step, settings=settings, files=files)
    files.append(describe(output, model_card.write(output / model_card.CARD, card)))
    write_manifest(
        output,
        files=files,
        job=job,
        step=step,
        settings=settings,
        base=trained.base,
        samples=[p.relative_to(output).as_posix() for p in samples],
    )
    return [*files, describe(output, output / MANIFEST)]


def scheduler_for(base: BaseModel) -> Any:
    import diffusers

    config = {**base.scheduler_config, "prediction_type": base.prediction_type}
    scheduler_class = getattr(diffusers, str(config.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    return scheduler_class.from_config(config)


def export_diffusers(trained: Trained, dest: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    pipeline: Any = StableDiffusionPipeline(
        vae=trained.vae,
        text_encoder=trained.text_encoder,
        tokenizer=trained.base.tokenizer,
        unet=trained.unet,
        scheduler=scheduler_for(trained.base),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with storage.atomic_path(dest) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        load_in_fp32_by_default(tmp)
        storage.make_readable(tmp)
    return dest


def load_in_fp32_by_default(folder: Path) -> None:
    """A half-precision folder loads as people load it, with no dtype argument.

    diffusers loads a UNet and a VAE in fp32 unless told otherwise, whatever their files hold;
    transformers 5 loads a text encoder in the dtype its config names, which saving an fp16
    model sets to float16: the plain ``from_pretrained(folder)`` then mixes fp16 and fp32 and
    fails at the first prompt.  The text encoders' configs name float32, as the rest of the
    pipeline loads; the files stay fp16 (half the size), and ``torch_dtype=torch.float16``
    still loads every part in fp16."""
    for config_path in sorted(folder.glob("text_encoder*/config.json")):
        config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def original_state_dict(trained: Trained) -> dict[str, Any]:
    components = convert.Components(
        unet=trained.unet.state_dict(),
        vae=trained.vae.state_dict(),
        text_encoder=trained.text_encoder.state_dict(),
        unet_config=trained.unet.config,
        vae_config=trained.vae.config,
        text_layout=trained.base.text_layout,
        extras=trained.base.extras,
    )
    return convert.to_original(components)


def export_single_file(trained: Trained, dest: Path, *, title: str | None, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    dtype = next(trained.unet.parameters()).dtype
    tensors = {
        key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in original_state_dict(trained).items()
    }
    base = trained.base
    metadata = {
        "format": "pt",
        "modelspec.architecture": _ARCHITECTURES[base.model_type],
        "modelspec.title": title or "model",
        # The model-spec spelling: "epsilon" or "v".
        "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
        "finetune.step": str(step),
        # The exact architecture, so that this file can be the base model of another run
        # offline whatever its size (see model.load_single_file).
        CONFIG_METADATA_KEY: json.dumps(base_configs(trained), default=str),
    }
    with storage.atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        storage.make_readable(tmp)
    del tensors
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dest


def export_original_config(trained: Trained, dest: Path) -> Path:
    """``<name>.yaml`` beside the single file: its architecture in the original layout's terms."""
    config = original_config.original_config(
        unet=dict(trained.unet.config),
        vae=dict(trained.vae.config),
        v2=trained.base.model_type != ModelType.V1X,
        prediction_type=trained.base.prediction_type,
        scheduler=trained.base.scheduler_config,
    )
    storage.write_text_atomic(dest, original_config.dump(config))
    storage.make_readable(dest)
    return dest


def _plain(config: Any) -> dict[str, Any]:
    # Where a model was read from is not part of its architecture.
    return {k: v for k, v in dict(config).items() if k not in ("_name_or_path", "_commit_hash")}


def base_configs(trained: Trained) -> dict[str, Any]:
    return {
        "unet": _plain(trained.unet.config),
        "vae": _plain(trained.vae.config),
        "text_encoder": _plain(trained.text_encoder.config.to_dict()),
        "scheduler": {**trained.base.scheduler_config, "prediction_type": trained.base.prediction_type},
        "model_type": str(trained.base.model_type),
    }


def describe(output: Path, path: Path) -> OutputFile:
    return OutputFile(
        path=path.relative_to(output).as_posix(), size_bytes=path.stat().st_size, sha256=storage.sha256_file(path)
    )


def list_files(output: Path, exports: list[Path]) -> list[OutputFile]:
    files: list[OutputFile] = []
    for export in exports:
        paths = sorted(p for p in export.rglob("*") if p.is_file()) if export.is_dir() else [export]
        files.extend(describe(output, p) for p in paths)
    return files


def write_manifest(
    output: Path,
    *,
    files: list[OutputFile],
    job: FineTuneJob,
    step: int,
    settings: dict[str, str],
    base: BaseModel,
    samples: Sequence[str] = (),
) -> Path:
    manifest = {
        "job": job.metadata.name,
        "time": now_rfc3339(),
        "step": step,
        "baseModel": {"uri": job.spec.base_model.uri, "type": str(base.model_type), "readFrom": base.source},
        "settings": settings,
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "files": [f.model_dump(mode="json", by_alias=True) for f in files],
        "samples": list(samples),
    }
    path = output / MANIFEST
    storage.write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    storage.make_readable(path)
    return path
