"""The job file, and the settings that will actually run on this device.

``resolve_settings`` is pure: given the spec and what the device can do, it returns the
settings in effect and one warning per setting that could not be honoured.  Nothing is
dropped silently: a setting either runs as asked, falls back with a warning that reaches
the resource, or is refused as bad input (see the trainer README for which is which).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from finetune_api.v1alpha1 import (
    FineTuneJob,
    FineTuneJobSpec,
    ManifestError,
    Method,
    ModelType,
    load_manifest,
)
from finetune_trainer import storage
from finetune_trainer.errors import BadInput

# Denoising steps of each generated class image (class_images.py uses it).
CLASS_IMAGE_STEPS = 25

PREDICTION_TYPES = {
    ModelType.V1X: "epsilon",
    ModelType.V2X_512: "epsilon",
    ModelType.V2X: "v_prediction",
    ModelType.SDXL: "epsilon",
    ModelType.FLUX1: "flow_matching",
}
# Families whose aspect-ratio buckets are on unless the spec says otherwise: those trained at
# 1024 px on photos of every shape.
BUCKETED = (ModelType.SDXL, ModelType.FLUX1)


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
    if spec.base_model.type not in PREDICTION_TYPES:
        raise BadInput(f"unknown model type {spec.base_model.type}", field="spec.baseModel.type")
    if spec.base_model.type == ModelType.FLUX1 and spec.resolution % 16:
        raise BadInput(
            f"{spec.resolution} is not a multiple of 16: Flux.1's latents (8 px each) are packed in 2 x 2 patches; "
            f"set it to {spec.resolution // 16 * 16} or {spec.resolution // 16 * 16 + 16}",
            field="spec.dataset.resolution",
        )
    for field, uri in (
        ("spec.baseModel.uri", spec.base_model.uri),
        ("spec.baseModel.vaeUri", spec.base_model.vae_uri),
        ("spec.baseModel.componentsUri", spec.base_model.components_uri),
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
    index: int = 0  # this process's GPU (LOCAL_RANK)
    bf16: bool = False
    xformers: bool = False
    bitsandbytes: bool = False
    # Why an installed xformers or bitsandbytes cannot be used here (its probe failed).
    xformers_problem: str = ""
    bitsandbytes_problem: str = ""
    # Why the base model cannot be quantized here (spec.training.baseQuantization; "" where it can).
    quantization_problem: str = ""
    compiler: bool = False  # what torch.compile needs to build code here (see compiler_present)
    memory_bytes: int = 0  # the GPU's memory (0: no GPU)


def detect_device(spec: FineTuneJobSpec | None = None) -> Device:
    """What this machine can do.  With a spec, the optional libraries (xformers, bitsandbytes)
    are probed: imported, and where the spec asks for them run once on the device.  A wheel
    built for another CUDA or ABI fails at import or at its first kernel, and diffusers,
    transformers and peft import whatever they find installed: a library that fails its probe
    is hidden from them (see ``hide_library``), so that it costs a warning, not the run.

    On a GPU every query and probe runs on this process's own GPU (``LOCAL_RANK``), made the
    current device first: probing on the default device would leave a CUDA context of every
    other process on GPU 0, and the memory read would be GPU 0's."""
    import torch

    cuda = torch.cuda.is_available()
    index = local_rank() if cuda else 0
    if cuda:
        torch.cuda.set_device(index)
    bf16 = native_bf16(index) if cuda else True  # autocast to bfloat16 runs on any CPU (slowly)
    device = f"cuda:{index}" if cuda else "cpu"
    xformers = cuda and _installed("xformers")
    bitsandbytes = _installed("bitsandbytes")
    xformers_problem = bitsandbytes_problem = ""
    if spec is not None:
        if _installed("xformers"):
            wanted = cuda and str(spec.training.attention) == "xformers"
            xformers_problem = probe(_xformers_op if wanted else _import("xformers.ops"), device)
            if xformers_problem:
                hide_library("xformers")
                xformers = False
        if bitsandbytes:
            wanted = str(spec.training.optimizer) == "AdamW8bit"
            bitsandbytes_problem = probe(_adamw8bit_step if wanted else _import("bitsandbytes"), device)
            if bitsandbytes_problem:
                bitsandbytes = False
                if _import_fails("bitsandbytes"):  # not only its kernels: its import breaks others
                    hide_library("bitsandbytes")
    quantization_problem = ""
    quantization = str(spec.training.base_quantization) if spec is not None else "none"
    if quantization != "none":
        if not bitsandbytes:
            quantization_problem = bitsandbytes_problem or "bitsandbytes is not installed"
        else:
            quantization_problem = probe(_quantized_layer(quantization, bf16=bf16), device)
    memory = 0
    if cuda:
        with contextlib.suppress(Exception):
            # What is free now (after this process's context and whatever else runs on the GPU),
            # not the card's total: the up-front check is against what this run can have.
            memory = int(torch.cuda.mem_get_info(index)[0])
    return Device(
        type="cuda" if cuda else "cpu",
        index=index,
        memory_bytes=memory,
        bf16=bf16,
        xformers=xformers,
        bitsandbytes=bitsandbytes,
        xformers_problem=xformers_problem,
        bitsandbytes_problem=bitsandbytes_problem,
        quantization_problem=quantization_problem,
        compiler=compiler_present(cuda=cuda),
    )


def local_rank() -> int:
    """This process's GPU among the node's: the launcher's ``LOCAL_RANK`` (0 when alone)."""
    try:
        return max(0, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0


# bf16 convolutions and matrix units in hardware: Ampere (compute capability 8.0) and newer.
BF16_MIN_CAPABILITY = (8, 0)


def native_bf16(index: int = 0) -> bool:
    """Whether GPU ``index`` computes bf16 in hardware.  ``torch.cuda.is_bf16_supported()``
    alone also counts emulation (since torch 2.3): on a T4, V100 or RTX 20xx it says yes,
    while cuDNN has no bf16 convolution engines there (a crash, or a fallback many times
    slower).  Only compute capability 8.0 and newer is taken."""
    import torch

    try:
        capability = tuple(torch.cuda.get_device_capability(index))
    except Exception:
        return False
    return capability >= BF16_MIN_CAPABILITY


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import(name: str) -> Callable[[str], None]:
    def load(device: str) -> None:
        importlib.import_module(name)

    return load


def _import_fails(name: str) -> bool:
    return bool(probe(_import(name), "cpu"))


def hide_library(name: str) -> None:
    """Make ``name`` look not installed to every later import check (``find_spec`` answers None
    for a module that ``sys.modules`` maps to None), and drop what a failed import left."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]
    sys.modules[name] = None  # type: ignore[assignment]


def probe(operation: Callable[[str], None], device: str) -> str:
    """Run ``operation`` once on ``device``: "" where it works, else what went wrong, in one line."""
    try:
        operation(device)
    except BaseException as exc:  # an import of a broken wheel can raise anything, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
    return ""


def _adamw8bit_step(device: str) -> None:
    import bitsandbytes
    import torch

    # 4,096 elements: the smallest a tensor may be for bitsandbytes to keep its state in 8 bits.
    parameter = torch.nn.Parameter(torch.ones(4096, device=device))
    optimizer = bitsandbytes.optim.AdamW8bit([parameter], lr=1e-3)
    parameter.grad = torch.full_like(parameter, 0.5)
    optimizer.step()
    if not bool(torch.isfinite(parameter).all()) or float(parameter.max()) >= 1.0:
        raise RuntimeError("one step of AdamW8bit did not update the parameter")


def _quantized_layer(quantization: str, *, bf16: bool) -> Callable[[str], None]:
    """One layer quantized the way the base model will be: diffusers' bitsandbytes quantizer must
    accept this machine (diffusers 0.42 wants a GPU: "No GPU found. A GPU is needed for
    quantization.", although bitsandbytes 0.50's own 4-bit and 8-bit layers run on a CPU), and a
    bitsandbytes layer of that kind must run forward and backward on the device (a wheel built
    for another CUDA fails here, not at step 1)."""

    def run(device: str) -> None:
        import bitsandbytes
        import torch
        from diffusers import BitsAndBytesConfig
        from diffusers.quantizers import DiffusersAutoQuantizer

        dtype = torch.bfloat16 if bf16 else torch.float16
        if quantization == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
            layer: Any = bitsandbytes.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            layer = bitsandbytes.nn.Linear4bit(64, 64, compute_dtype=dtype, quant_type="nf4")
        quantizer = DiffusersAutoQuantizer.from_config(cast(Any, config))
        quantizer.validate_environment(torch_dtype=dtype, device_map=None)
        layer = layer.to(device)
        inputs = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        layer(inputs).float().sum().backward()
        if inputs.grad is None or not bool(torch.isfinite(inputs.grad).all()):
            raise RuntimeError(f"a {quantization} layer gave no finite gradient")

    return run


def _xformers_op(device: str) -> None:
    import torch
    import xformers.ops

    query = torch.randn(1, 16, 2, 32, device=device, dtype=torch.float16)
    out = xformers.ops.memory_efficient_attention(query, query, query)
    if out.shape != query.shape or not bool(torch.isfinite(out).all()):
        raise RuntimeError("memory_efficient_attention returned a wrong result")


def compiler_present(*, cuda: bool) -> bool:
    """Whether torch.compile can build code here: on a GPU, Triton compiles its launchers with a
    C compiler against Python's headers; on a CPU, inductor writes C++."""
    if cuda:
        headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
        return headers.is_file() and any(c and shutil.which(c) for c in (os.environ.get("CC"), "gcc", "clang"))
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++"))


# A compiled SD 1.5 UNet step on an H100 took about 2 minutes to compile and then ran at 9.5
# steps/s against 6.3 eager (bf16, fused AdamW, channels_last): about 0.05 s saved a step, so
# the compile repays itself after some 2,300 steps.  Below this many steps an unset
# ``compile`` stays off.
COMPILE_MIN_STEPS = 2500
# Where that was measured: SD 1.x's UNet, at one square size.  Nothing else was (SDXL's UNet,
# a 12 B Flux transformer, whose compile time is unknown), and with aspect-ratio buckets each
# size compiles anew when it first comes up, mid-run: an unset ``compile`` stays off there.
COMPILE_MEASURED = (ModelType.V1X,)
# Below this a LoRA run is warned: diffusers' and kohya's LoRA runs use 1e-4.
LORA_LOW_LEARNING_RATE = 1.0e-5


@dataclass(frozen=True)
class Settings:
    """The settings in effect for this run (after device fallbacks and the fast path's choices).

    Every field is in each progress event, the summary and the manifest (``as_report``)."""

    mixed_precision: str
    attention: str
    optimizer: str
    compile: bool
    gradient_checkpointing: bool
    cache_latents: bool
    prediction_type: str
    device: str
    # The peak learning rate and the resolution in effect (the spec's, else the defaults of
    # the method and the family), so that the resource shows what actually ran.
    learning_rate: float = 0.0
    resolution: int = 0
    # Aspect-ratio buckets (the spec's, else on for the families trained at 1024 px).
    buckets: bool = False
    compile_mode: str = "default"
    # torch.optim.AdamW(fused=True): one kernel for all parameters (CUDA; AdamW only).
    fused_optimizer: bool = False
    # The UNet's weights and inputs in channels_last (NHWC) order, which GPU convolutions prefer.
    channels_last: bool = False
    # The frozen text encoder's output for each distinct prompt, computed once.
    cache_prompts: bool = False
    # cuDNN tries its convolution kernels at the first step and keeps the fastest.
    cudnn_benchmark: bool = False
    # flux1: the frozen transformer's quantization, and how timesteps are drawn.
    base_quantization: str = "none"
    timestep_sampling: str = ""

    def as_report(self) -> dict[str, str]:
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}


def resolve_settings(
    spec: FineTuneJobSpec, device: Device, *, total_steps: int | None = None
) -> tuple[Settings, list[str]]:
    """The settings in effect and a warning for each one that differs from the spec.

    ``total_steps`` decides whether an unset ``compile`` is worth it.  Without it (before the
    images are counted) an unset ``compile`` is left undecided: off, and nothing said."""
    training = spec.training
    warnings: list[str] = []
    precision = str(training.mixed_precision)
    if precision == "fp16" and device.type != "cuda":
        warnings.append(
            "spec.training.mixedPrecision: fp16 needs a CUDA GPU (no loss scaling on this device); "
            "training in fp32 (mixedPrecision: no) instead"
        )
        precision = "no"
    elif precision == "fp16" and device.bf16 and training.prefer_bf16:
        warnings.append(
            "spec.training.mixedPrecision: this GPU supports bf16; training in bf16 instead of fp16 (the same "
            "memory, no loss scaling to synchronise on, coarser rounding); set spec.training.preferBf16: false "
            "to keep fp16"
        )
        precision = "bf16"
    elif precision == "bf16" and not device.bf16:
        warnings.append(
            "spec.training.mixedPrecision: this GPU has no bf16 support; training with fp16 mixed precision instead"
        )
        precision = "fp16"

    attention = str(training.attention)
    if attention == "xformers" and not device.xformers:
        why = "xformers needs a CUDA GPU"
        if device.type == "cuda":
            why = (
                f"xformers is installed but does not work here ({device.xformers_problem})"
                if device.xformers_problem
                else "xformers is not installed"
            )
        warnings.append(f"spec.training.attention: {why}; using sdpa (PyTorch's fused attention) instead")
        attention = "sdpa"

    optimizer = str(training.optimizer)
    if optimizer == "AdamW8bit" and not device.bitsandbytes:
        why = (
            f"bitsandbytes, which is installed but does not work here ({device.bitsandbytes_problem})"
            if device.bitsandbytes_problem
            else "bitsandbytes, which is not installed"
        )
        warnings.append(
            f"spec.training.optimizer: AdamW8bit needs {why}; "
            "using AdamW (about four times the optimizer memory) instead"
        )
        optimizer = "AdamW"

    model_type = ModelType(spec.base_model.type)
    flux = model_type == ModelType.FLUX1
    if flux and attention != "sdpa":
        warnings.append(
            f"spec.training.attention: Flux.1's transformer attends through PyTorch's SDPA here; {attention} is not "
            "used"
        )
        attention = "sdpa"
    quantization = str(training.base_quantization)
    if quantization != "none" and device.quantization_problem:
        warnings.append(
            f"spec.training.baseQuantization: {quantization} needs bitsandbytes quantization through diffusers, which "
            f"does not work on this device ({device.quantization_problem}); the transformer is trained unquantized in "
            f"{'fp32' if precision == 'no' else precision} instead (about 24 GB of weights for Flux.1 instead of "
            f"{'12' if quantization == 'int8' else '6.7'} GB)"
        )
        quantization = "none"
    if flux and spec.samples.prompts and spec.samples.negative_prompt:
        warnings.append(
            "spec.samples.negativePrompt: Flux.1 is guidance-distilled and its samples take no negative prompt; "
            "it is not used"
        )

    if spec.method == Method.LORA and spec.learning_rate < LORA_LOW_LEARNING_RATE:
        warnings.append(
            f"spec.training.learningRate: {spec.learning_rate:g} is low for LoRA (adapters start from zero; "
            f"diffusers and kohya use 1e-4): the model may learn almost nothing; unset it for 1e-4"
        )

    bucketed = spec.dataset.buckets if spec.dataset.buckets is not None else model_type in BUCKETED
    compile_, compile_mode, compile_warnings = _resolve_compile(
        spec, device, total_steps=total_steps, quantized=quantization != "none", bucketed=bucketed
    )
    warnings += compile_warnings
    cuda = device.type == "cuda"
    settings = Settings(
        mixed_precision=precision,
        attention=attention,
        optimizer=optimizer,
        compile=compile_,
        gradient_checkpointing=training.gradient_checkpointing,
        cache_latents=training.cache_latents,
        prediction_type=PREDICTION_TYPES[model_type],
        device=device.type,
        learning_rate=spec.learning_rate,
        resolution=spec.resolution,
        buckets=bucketed,
        compile_mode=compile_mode,
        fused_optimizer=cuda and optimizer == "AdamW",
        # bitsandbytes makes every parameter contiguous again at each step (a copy of the
        # UNet a step, and under torch.compile a recompile): no channels_last with it.  Flux's
        # transformer has no convolutions to gain from it.
        channels_last=cuda and optimizer != "AdamW8bit" and not flux,
        cache_prompts=not trains_text_encoder(spec),
        cudnn_benchmark=cuda,
        base_quantization=quantization,
        timestep_sampling=str(training.timestep_sampling or "logit_normal") if flux else "",
    )
    return settings, warnings


def trains_text_encoder(spec: FineTuneJobSpec) -> bool:
    """Method LoRA: adapters on the text encoder, or a new word's rows of its embedding table
    (pivotal tuning); DreamBooth: the whole text encoder; Textual Inversion: always (its word's
    rows)."""
    if spec.method == Method.TEXTUAL_INVERSION:
        return True
    if spec.method == Method.LORA:
        return spec.lora.train_text_encoder or spec.lora.new_tokens is not None
    return spec.training.train_text_encoder


def _resolve_compile(
    spec: FineTuneJobSpec, device: Device, *, total_steps: int | None, quantized: bool = False, bucketed: bool = False
) -> tuple[bool, str, list[str]]:
    training = spec.training
    warnings: list[str] = []
    if training.compile is None and total_steps is None:
        return False, "default", warnings  # decided once the length of the run is known
    if training.compile is None:
        # bitsandbytes' quantized layers under torch.compile have not been measured here: an unset
        # compile leaves a quantized base eager.
        compile_ = (
            device.type == "cuda"
            and device.compiler
            and (total_steps or 0) >= COMPILE_MIN_STEPS
            and not quantized
            and ModelType(spec.base_model.type) in COMPILE_MEASURED
            and not bucketed
        )
    elif training.compile and not device.compiler:
        needs = "a C compiler and Python's headers (gcc, python3-dev)" if device.type == "cuda" else "a C++ compiler"
        warnings.append(
            f"spec.training.compile: torch.compile needs {needs} on this machine, and none was found; not compiling"
        )
        compile_ = False
    else:
        compile_ = training.compile
    mode = str(training.compile_mode)
    if mode == "reduce-overhead":
        why = ""
        if not compile_:
            why = "it applies to a compiled UNet and this run is not compiled (set spec.training.compile: true)"
        elif device.type != "cuda":
            why = "CUDA graphs need a CUDA GPU"
        elif training.gradient_accumulation_steps > 1:
            why = (
                "CUDA graphs would overwrite the gradients of one micro-batch with the next; "
                "set spec.training.gradientAccumulationSteps: 1 to use them"
            )
        if why:
            warnings.append(f"spec.training.compileMode: reduce-overhead not used: {why}")
            mode = "default"
    return compile_, mode, warnings


# --- several processes ------------------------------------------------------------------------
#
# The main process alone pulls an object-store output, generates class images, renders samples
# and uploads checkpoints, while the other processes wait at a barrier.  A barrier over NCCL
# gives up after the process group's timeout (10 minutes by default), which a slow upload or a
# hundred class images outlast: the timeout is set from the work instead.

# A UNet pass at 512 px on a slow GPU (a T4 in fp16 takes about 0.2 s): five times that.
SECONDS_PER_UNET_PASS_512 = 1.0
# A slow link to an object store.
UPLOAD_BYTES_PER_SECOND = 10 * 2**20
MIN_PROCESS_GROUP_TIMEOUT_S = 30 * 60
# Parameters of what a DreamBooth checkpoint holds (the UNet; the text encoders).
_UNET_PARAMS = {ModelType.V1X: 860e6, ModelType.V2X_512: 866e6, ModelType.V2X: 866e6, ModelType.SDXL: 2.57e9}
_TEXT_PARAMS = {ModelType.V1X: 123e6, ModelType.V2X_512: 340e6, ModelType.V2X: 340e6, ModelType.SDXL: 817e6}
_LORA_CHECKPOINT_BYTES = 512 * 2**20


def checkpoint_bytes(spec: FineTuneJobSpec) -> float:
    """About how large one checkpoint is: fp32 weights and the optimizer's state."""
    if spec.method in (Method.LORA, Method.TEXTUAL_INVERSION):
        return _LORA_CHECKPOINT_BYTES
    model_type = ModelType(spec.base_model.type)
    params = _UNET_PARAMS[model_type] + (_TEXT_PARAMS[model_type] if spec.training.train_text_encoder else 0)
    per_param = 4 + (2 if str(spec.training.optimizer) == "AdamW8bit" else 8)
    return params * per_param


def process_group_timeout(spec: FineTuneJobSpec, *, remote_output: bool) -> int:
    """Seconds the other processes may wait at a barrier for the main process: twice the
    longest of what it does alone, estimated for a slow GPU and a slow link, and at least 30
    minutes."""
    scale = (spec.resolution / 512) ** 2
    passes = 0
    if spec.dataset.prior_preservation:
        passes = max(passes, spec.dataset.num_class_images * CLASS_IMAGE_STEPS * 2)  # with guidance
    passes = max(passes, len(spec.samples.prompts) * spec.samples.num_inference_steps * 2)
    from finetune_trainer.families import family_of

    seconds = passes * SECONDS_PER_UNET_PASS_512 * scale * family_of(spec.base_model.type).pass_cost
    if remote_output:
        # A checkpoint uploaded (or the newest pulled back) at each save.
        seconds = max(seconds, checkpoint_bytes(spec) / UPLOAD_BYTES_PER_SECOND)
    return int(max(MIN_PROCESS_GROUP_TIMEOUT_S, 2 * seconds + 600))


# --- memory ---------------------------------------------------------------------------------------

GIB = 2**30
# What of a GPU's memory a run may plan to use: the CUDA context, the allocator's fragments and
# the caching of kernels take the rest.
USABLE_FRACTION = 0.95


# The VAE encoder's transient memory for one 1024 px image in fp32, under no_grad (SDXL's and
# Flux's VAE: 128-512 channels at full and half size; 8 images at 1024 px took 12 GiB): it
# scales with the pixels and the bytes of the dtype.
VAE_ENCODE_BYTES_1024_FP32 = 1.5 * GIB
# The most examples of one size encoded in one VAE pass (kohya's vae_batch_size defaults to 1).
MAX_CACHING_BATCH = 8
# The share of free GPU memory the caching may take for its batch.
CACHING_SHARE = 0.5


def vae_encode_bytes(resolution: int, *, dtype_bytes: int, images: int = 1) -> float:
    """What encoding ``images`` pictures of ``resolution`` px at once takes, beyond the VAE's weights."""
    return VAE_ENCODE_BYTES_1024_FP32 * (resolution / 1024) ** 2 * (dtype_bytes / 4) * images


def caching_batch(resolution: int, *, dtype_bytes: int, variants: int, free_bytes: int | None) -> int:
    """Examples per VAE pass while the latents are cached: as many as half the free GPU memory
    holds (each example is ``variants`` pictures: with random flips, two), 1 to 8; 8 off a GPU
    (``free_bytes`` None), where host memory is not the limit."""
    if free_bytes is None:
        return MAX_CACHING_BATCH
    per_example = vae_encode_bytes(resolution, dtype_bytes=dtype_bytes, images=variants)
    return int(max(1, min(MAX_CACHING_BATCH, free_bytes * CACHING_SHARE // per_example)))


def prompt_cache_bytes(spec: FineTuneJobSpec) -> float:
    """What the prompt cache may hold on the GPU: its whole device share (``prompt_cache``),
    since the number of distinct captions is not known before the images are read; nothing
    where the text encoders train or captions are shuffled (prompts are encoded every step)."""
    from finetune_trainer import prompt_cache

    if trains_text_encoder(spec) or spec.dataset.shuffle_caption:
        return 0.0
    return float(prompt_cache.DEVICE_BYTES)


def run_memory(spec: FineTuneJobSpec, family: Any, *, mixed_precision: str, optimizer: str) -> Any:
    """The family's estimate of a training step, with what the recipe keeps beside it: the
    prompt cache's share of the GPU, and the latent caching's one-picture VAE pass where that
    is more than the step's activations (the caching runs before the first step).  None where
    the family gives no estimate."""
    from finetune_trainer.families import MemoryEstimate

    need = family.memory_needed(spec, mixed_precision=mixed_precision, optimizer=optimizer)
    if need is None:
        return None
    prompts = prompt_cache_bytes(spec)
    caching = 0.0
    if spec.training.cache_latents:
        vae_bytes = 4 if family.vae_overflows_in_fp16 or mixed_precision == "no" else 2
        variants = 2 if spec.dataset.random_flip else 1
        caching = max(0.0, vae_encode_bytes(spec.resolution, dtype_bytes=vae_bytes, images=variants) - need.activations)
    basis = need.basis
    if prompts or caching:
        basis += (
            f"; with {prompts / GIB:.2f} GiB of cached prompts and {caching / GIB:.2f} GiB more for caching latents"
        )
    return MemoryEstimate(bytes=need.bytes + prompts + caching, basis=basis, activations=need.activations)


# A setting that saves memory: its name, the change, and the optimizer it switches to.
_Change = tuple[str, Callable[[FineTuneJobSpec], FineTuneJobSpec], str | None]


def memory_check(
    spec: FineTuneJobSpec, family: Any, *, mixed_precision: str, optimizer: str, gpu_bytes: int
) -> str | None:
    """None where the run fits the GPU by the family's estimate; else a sentence saying what it
    needs and which settings, applied in order, would make it fit."""
    need = run_memory(spec, family, mixed_precision=mixed_precision, optimizer=optimizer)
    usable = gpu_bytes * USABLE_FRACTION
    if need is None or need.bytes <= usable:
        return None
    # Changes that save memory, cheapest for the result first; each is tried on top of the ones
    # before it until the estimate fits.
    changes: list[_Change] = []
    training = spec.training
    if not training.gradient_checkpointing:
        changes.append(("spec.training.gradientCheckpointing: true", _with_training(gradient_checkpointing=True), None))
    if optimizer != "AdamW8bit":
        changes.append(("spec.training.optimizer: AdamW8bit", lambda s: s, "AdamW8bit"))
    if spec.method == Method.DREAMBOOTH and training.train_text_encoder:
        changes.append(("spec.training.trainTextEncoder: false", _with_training(train_text_encoder=False), None))
    if spec.method == Method.DREAMBOOTH:
        changes.append(("spec.method: LoRA", lambda s: s.model_copy(update={"method": Method.LORA}), None))
    if spec.base_model.type == ModelType.FLUX1:
        for quantization in ("int8", "nf4"):
            if str(training.base_quantization) not in (quantization, "nf4"):
                changes.append(
                    (
                        f"spec.training.baseQuantization: {quantization}",
                        _with_training(base_quantization=quantization),
                        None,
                    )
                )
        if spec.lora.train_text_encoder:
            changes.append(
                (
                    "spec.training.lora.trainTextEncoder: false (T5-XXL then leaves the GPU)",
                    _with_lora(train_text_encoder=False),
                    None,
                )
            )
        if spec.dataset.shuffle_caption:
            changes.append(
                (
                    "spec.dataset.shuffleCaption: false (T5-XXL then leaves the GPU)",
                    _with_dataset(shuffle_caption=False),
                    None,
                )
            )
    if training.batch_size > 1:
        changes.append(
            (
                "spec.training.batchSize: 1 (with gradientAccumulationSteps for the same batch)",
                _with_training(batch_size=1),
                None,
            )
        )
    if spec.resolution > 768:
        changes.append(("spec.dataset.resolution: 768", _with_dataset(resolution=768), None))
    if spec.resolution > 512 and spec.base_model.type == ModelType.FLUX1:
        changes.append(("spec.dataset.resolution: 512", _with_dataset(resolution=512), None))
    fixes: list[str] = []
    fitted = False
    current = spec
    for name, change, new_optimizer in changes:
        current = change(current)
        optimizer = new_optimizer or optimizer
        fixes.append(name)
        estimate = run_memory(current, family, mixed_precision=mixed_precision, optimizer=optimizer)
        if estimate is not None and estimate.bytes <= usable:
            fitted = True
            break
    what = f"{family.name} {spec.method} at {spec.resolution} px"
    head = (
        f"{what} needs about {need.bytes / GIB:.1f} GiB of GPU memory ({need.basis}); this GPU has "
        f"{gpu_bytes / GIB:.1f} GiB"
    )
    if fitted:
        return f"{head}. Settings that fit: {'; '.join(fixes)}"
    return f"{head}, and no change of settings makes it fit; a GPU with more memory (spec.resources) is needed"


def _with_training(**update: Any) -> Callable[[FineTuneJobSpec], FineTuneJobSpec]:
    return lambda s: s.model_copy(update={"training": s.training.model_copy(update=update)})


def _with_lora(**update: Any) -> Callable[[FineTuneJobSpec], FineTuneJobSpec]:
    def change(s: FineTuneJobSpec) -> FineTuneJobSpec:
        return _with_training(lora=s.lora.model_copy(update=update))(s)

    return change


def _with_dataset(**update: Any) -> Callable[[FineTuneJobSpec], FineTuneJobSpec]:
    return lambda s: s.model_copy(update={"dataset": s.dataset.model_copy(update=update)})


def total_steps(
    spec: FineTuneJobSpec, num_images: int, *, num_processes: int = 1, seen_per_epoch: int | None = None
) -> int:
    """Optimizer steps in the whole run: maxSteps, else as many as it takes for each instance
    image to be seen ``stepsPerImage`` times (the web UI's "steps per image", which are epochs;
    an epoch sees each image as often as its concept's repeats say, ``seen_per_epoch`` in all):
    ceil(stepsPerImage x images x repeats / (batchSize x gradientAccumulationSteps x processes))."""
    training = spec.training
    if training.max_steps is not None:
        return training.max_steps
    assert training.steps_per_image is not None  # the model validator requires one of the two
    per_step = training.batch_size * training.gradient_accumulation_steps * num_processes
    seen = seen_per_epoch if seen_per_epoch is not None else num_images
    return max(1, math.ceil(training.steps_per_image * seen / per_step))
