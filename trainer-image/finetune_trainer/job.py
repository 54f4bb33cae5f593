"""The job file, and the settings that will actually run on this device.

``resolve_settings`` is pure: given the spec and what the device can do, it returns the
settings in effect and one warning per setting that could not be honoured.  Nothing is
dropped silently: a setting either runs as asked, falls back with a warning that reaches
the resource, or is refused as bad input (see the trainer README for which is which).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune_operator.api.v1alpha1 import (
    FineTuneJob,
    FineTuneJobSpec,
    ManifestError,
    Method,
    ModelType,
    load_manifest,
)
from finetune_trainer import storage
from finetune_trainer.errors import BadInput

PREDICTION_TYPES = {
    ModelType.V1X: "epsilon",
    ModelType.V2X_512: "epsilon",
    ModelType.V2X: "v_prediction",
}


def load_job(path: str | Path) -> FineTuneJob:
    """Read and validate a FineTuneJob manifest; every problem is bad input."""
    try:
        job = load_manifest(path)
    except FileNotFoundError:
        raise BadInput(f"job file {path} does not exist") from None
    except ManifestError as exc:
        raise BadInput(str(exc)) from None
    check_supported(job.spec)
    return job


def check_supported(spec: FineTuneJobSpec) -> None:
    """Refuse up front what this trainer cannot run, naming the setting to change."""
    if spec.method == Method.LORA and spec.training.train_text_encoder:
        raise BadInput(
            "trainTextEncoder trains the whole text encoder (method DreamBooth); with method LoRA set "
            "spec.training.lora.trainTextEncoder: true to put adapters on it instead",
            field="spec.training.trainTextEncoder",
        )
    if spec.base_model.type == ModelType.SDXL:
        raise BadInput("sdxl is not supported by the trainer yet; use v1x, v2x-512 or v2x", field="spec.baseModel.type")
    if spec.base_model.type not in PREDICTION_TYPES:
        raise BadInput(f"unknown model type {spec.base_model.type}", field="spec.baseModel.type")
    for field, uri in (
        ("spec.baseModel.uri", spec.base_model.uri),
        ("spec.dataset.instanceImages", spec.dataset.instance_images),
        ("spec.dataset.classImages", spec.dataset.class_images),
        ("spec.output.uri", spec.output.uri),
    ):
        if uri is not None:
            storage.local_path(uri, field=field)  # raises for pvc:// on a workstation
    output = spec.output.uri
    if storage.local_path(output, field="spec.output.uri") is None and (
        storage.scheme(output) not in storage.OBJECT_STORE_SCHEMES
    ):
        raise BadInput(
            f"{output}: an output is a local folder, pvc://CLAIM/path, s3://BUCKET/path or gs://BUCKET/path",
            field="spec.output.uri",
        )


@dataclass(frozen=True)
class Device:
    """What this machine can do, as far as the settings care."""

    type: str  # "cuda" or "cpu"
    bf16: bool = False
    xformers: bool = False
    bitsandbytes: bool = False


def detect_device() -> Device:
    import torch

    cuda = torch.cuda.is_available()
    bf16 = False
    if cuda:
        with contextlib.suppress(Exception):
            bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        bf16 = True  # autocast to bfloat16 runs on any CPU (slowly without native support)
    return Device(
        type="cuda" if cuda else "cpu",
        bf16=bf16,
        xformers=cuda and importlib.util.find_spec("xformers") is not None,
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
    )


@dataclass(frozen=True)
class Settings:
    """The settings in effect for this run (after device fallbacks)."""

    mixed_precision: str
    attention: str
    optimizer: str
    compile: bool
    gradient_checkpointing: bool
    cache_latents: bool
    prediction_type: str
    device: str

    def as_report(self) -> dict[str, str]:
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}


def resolve_settings(spec: FineTuneJobSpec, device: Device) -> tuple[Settings, list[str]]:
    training = spec.training
    warnings: list[str] = []
    precision = str(training.mixed_precision)
    if precision == "fp16" and device.type != "cuda":
        warnings.append(
            "spec.training.mixedPrecision: fp16 needs a CUDA GPU (no loss scaling on this device); "
            "training in fp32 (mixedPrecision: no) instead"
        )
        precision = "no"
    elif precision == "bf16" and not device.bf16:
        warnings.append(
            "spec.training.mixedPrecision: this GPU has no bf16 support; training with fp16 mixed precision instead"
        )
        precision = "fp16"

    attention = str(training.attention)
    if attention == "xformers" and not device.xformers:
        why = "xformers is not installed" if device.type == "cuda" else "xformers needs a CUDA GPU"
        warnings.append(f"spec.training.attention: {why}; using sdpa (PyTorch's fused attention) instead")
        attention = "sdpa"

    optimizer = str(training.optimizer)
    if optimizer == "AdamW8bit" and not device.bitsandbytes:
        warnings.append(
            "spec.training.optimizer: AdamW8bit needs bitsandbytes, which is not installed; "
            "using AdamW (about four times the optimizer memory) instead"
        )
        optimizer = "AdamW"

    compile_ = False
    if training.compile and device.type != "cuda":
        warnings.append("spec.training.compile: torch.compile is used on CUDA GPUs only; not compiling on this device")
    elif training.compile:
        compile_ = True

    settings = Settings(
        mixed_precision=precision,
        attention=attention,
        optimizer=optimizer,
        compile=compile_,
        gradient_checkpointing=training.gradient_checkpointing,
        cache_latents=training.cache_latents,
        prediction_type=PREDICTION_TYPES[ModelType(spec.base_model.type)],
        device=device.type,
    )
    return settings, warnings


def total_steps(spec: FineTuneJobSpec, num_images: int) -> int:
    """Optimizer steps in the whole run: maxSteps, else stepsPerImage x instance images."""
    if spec.training.max_steps is not None:
        return spec.training.max_steps
    assert spec.training.steps_per_image is not None  # the model validator requires one of the two
    return spec.training.steps_per_image * num_images
