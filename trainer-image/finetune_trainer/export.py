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
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import FineTuneJob, Method, OutputFile, OutputFormat
from finetune_trainer import lora, model_card, storage, textual_inversion
from finetune_trainer.families import BaseModel, ModelFamily
from finetune_trainer.families.base import CONFIG_METADATA_KEY
from finetune_trainer.report import now_rfc3339

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune_trainer")

DIFFUSERS_DIR = "diffusers"
MANIFEST = "manifest.json"


@dataclass
class Trained:
    """The models as training left them, and where they came from."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    base: BaseModel
    # Method LoRA: whether the text encoders carry adapters too.
    text_encoder_adapters: bool = False
    # Method TextualInversion: the learned word (a textual_inversion.Learned).
    learned: Any = None

    @property
    def family(self) -> ModelFamily:
        return self.base.family


def single_file_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name or 'model'}.safetensors"


def lora_file_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name or 'model'}-lora.safetensors"


def embedding_file_name(job: FineTuneJob) -> str:
    """Pivotal tuning's word in the web UIs' layout, named as diffusers' advanced script names it
    (the web UIs take an embedding's file name as its word in prompts)."""
    return f"{job.metadata.name or 'model'}_emb.safetensors"


def _export_word(
    trained: Trained, output: Path, *, job: FineTuneJob, name: str, dtype: torch.dtype, step: int
) -> list[Path]:
    return textual_inversion.export(
        trained.learned,
        trained.text_encoders,
        output,
        webui_name=name,
        dtype=dtype,
        title=job.metadata.name or "model",
        step=step,
    )


def export_all(
    trained: Trained,
    output: Path,
    *,
    job: FineTuneJob,
    step: int,
    settings: dict[str, str],
    pictures: Sequence[Path] = (),
    samples: Sequence[Path] = (),
    scores: Sequence[tuple[int, dict[str, float]]] = (),
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
        family, model_type = trained.family, trained.base.model_type
        text_encoders = lora.adapted(family, trained.text_encoders) if trained.text_encoder_adapters else []
        if spec.lora.type in lora.DIFFUSERS_KINDS:
            written.append(
                lora.export_diffusers(family, trained.unet, text_encoders, output / lora.LORA_DIR, dtype=dtype)
            )
        else:
            written.append(lora.export_peft(family, trained.unet, text_encoders, output / lora.LORA_DIR, dtype=dtype))
        written.append(
            lora.export_kohya(
                family,
                trained.unet,
                text_encoders,
                output / lora_file_name(job),
                settings=spec.lora,
                model_type=model_type,
                title=job.metadata.name or "model",
                step=step,
                dtype=dtype,
                architecture=family.architecture(model_type, base=trained.base),
            )
        )
        if trained.learned is not None:
            # Pivotal tuning: the word beside the adapters, in both layouts.
            written += _export_word(trained, output, job=job, name=embedding_file_name(job), dtype=dtype, step=step)
        full_model = spec.output.merge_lora
        if full_model:
            lora.merge(trained.unet, text_encoders)
    elif spec.method == Method.TEXTUAL_INVERSION:
        written += _export_word(trained, output, job=job, name=single_file_name(job), dtype=dtype, step=step)
        full_model = False
    if full_model:
        # Training is over (its final state is in the last checkpoint), so the models are cast
        # in place rather than copied: a copy of an SD UNet would cost gigabytes.
        for module in (trained.unet, trained.vae, *trained.text_encoders):
            module.to(dtype)
        formats = set(spec.output.formats)
        if OutputFormat.DIFFUSERS in formats:
            written.append(export_diffusers(trained, output / DIFFUSERS_DIR))
        if OutputFormat.SAFETENSORS in formats:
            single = export_single_file(trained, output / single_file_name(job), title=job.metadata.name, step=step)
            written.append(single)
            # What belongs beside it (SD 2.x: the .yaml the web UIs read v-prediction from).
            written += trained.family.extra_exports(trained=trained, single_file=single)
    written += [p for p in pictures if p.is_file()]
    files = list_files(output, written)
    card = model_card.render(job, step=step, settings=settings, files=files, scores=scores)
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


def export_diffusers(trained: Trained, dest: Path) -> Path:
    pipeline = trained.family.pipeline(
        base=trained.base, unet=trained.unet, text_encoders=trained.text_encoders, vae=trained.vae
    )
    with storage.atomic_path(dest) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        load_in_fp32_by_default(tmp)
        name_text_encoder_weights_as_before(tmp)
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


def name_text_encoder_weights_as_before(folder: Path) -> None:
    """Text encoders' weights under the names every transformers version reads.

    transformers 5.6 flattened CLIPTextModel, and saves its weights without the ``text_model.``
    prefix that every earlier version writes and expects; an earlier transformers (InvokeAI
    6.14 pins 5.5) then reads none of them and leaves the text encoder random, saying so only
    in a load report.  The prefix is put back (current versions read either name)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for encoder in sorted(folder.glob("text_encoder*")):
        files = sorted(encoder.glob("*.safetensors"))
        renamed: dict[str, str] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            names = {k: k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}" for k in tensors}
            if all(k == v for k, v in names.items()):
                continue
            renamed.update(names)
            save_file({names[k]: v for k, v in tensors.items()}, str(path), metadata=metadata)
        index = encoder / "model.safetensors.index.json"
        if renamed and index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {renamed.get(k, k): v for k, v in data.get("weight_map", {}).items()}
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def original_state_dict(trained: Trained) -> dict[str, Any]:
    return dict(
        trained.family.original_state_dict(
            model_type=trained.base.model_type,
            unet=trained.unet,
            vae=trained.vae,
            text_encoders=trained.text_encoders,
            extras=trained.base.extras,
        )
    )


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
        "modelspec.architecture": base.family.architecture(base.model_type, base=base),
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


def _plain(config: Any) -> dict[str, Any]:
    # Where a model was read from is not part of its architecture.
    return {k: v for k, v in dict(config).items() if k not in ("_name_or_path", "_commit_hash")}


def base_configs(trained: Trained) -> dict[str, Any]:
    return {
        "unet": _plain(trained.unet.config),
        "vae": _plain(trained.vae.config),
        **{
            part: _plain(encoder.config.to_dict())
            for part, encoder in zip(trained.family.text_encoder_parts, trained.text_encoders, strict=True)
        },
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
