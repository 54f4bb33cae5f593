"""The trainer's DreamBooth step against a textbook one: same model, same settings, same run.

    make bench-trainer                          # CPU: a tiny pipeline built here, 64 px
    make bench-trainer BENCH_ARGS=--sd15        # SD 1.5's architecture, random weights, 512 px (a GPU)
    make bench-trainer BENCH_ARGS=--sdxl        # SDXL's architecture, random weights, 1024 px (a GPU;
                                                # on a CPU the tiny SDXL pipeline at 64 px)
    make bench-trainer BENCH_ARGS=--flux        # Flux.1-dev's architecture, random weights, 1024 px,
                                                # unquantized and nf4 (a GPU; on a CPU the tiny
                                                # Flux pipeline at 64 px, where nf4 falls back)

The textbook step is written here the way diffusers' ``train_dreambooth.py`` and
``train_dreambooth_lora.py`` do it: encode the image with the VAE and the prompt with the
text encoder, add noise, UNet, MSE, backward, clip, optimizer step, and read the loss back
every step.  The trainer's step is ``DreamBoothRecipe.train`` itself, set up from a manifest.
Each (setting, variant) runs in a process of its own, so that peak memory, compiled code
and accelerate's process-wide state are its own.  Measured per variant: steps/s over the
steps after the warm-up, seconds from the start of its process to the end of the first step
(imports, loading, caching and compiling included), and peak memory: on a GPU what torch allocated, on a CPU
the process's peak resident memory (which includes Python and torch themselves).

The settings are the three rows of the measurements quoted in the issue (diffusers' own
scripts on one H100): the web-UI tutorial's (fp16, 8-bit AdamW), the same with gradient
checkpointing and set_grads_to_none, and LoRA rank 8 in fp16.  On a CPU, fp16 runs as fp32
for both.  Results are merged into ``bench/results/trainer-step.json`` (one entry per device
and model) and written as ``bench/results/trainer-step.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Seconds to the first step count from here: the start of the process (imports included).
STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPT = "a photo of sks ball"
IMAGES = 4
WINDOWS = 5  # the timed steps are split into this many windows; steps/s is their median


@dataclass(frozen=True)
class Setting:
    label: str
    method: str  # DreamBooth | LoRA
    optimizer: str
    precision: str
    gradient_checkpointing: bool
    set_grads_to_none: bool  # the textbook's zero_grad; the trainer always sets them to None
    learning_rate: float
    # diffusers' scripts on one H100 (steps/s, peak allocated GB), and the issue's targets.
    reference: tuple[float, float]
    target_steps_per_s: float
    # Flux: the frozen transformer's quantization (bitsandbytes through diffusers, CUDA only).
    quantization: str = "none"


SETTINGS = {
    "tutorial": Setting("the tutorial's: fp16, 8-bit AdamW", "DreamBooth", "AdamW8bit", "fp16", False, False, 2e-6,
                        (2.9, 12.2), 8.8),
    "checkpointing": Setting("+ gradient checkpointing, set_grads_to_none", "DreamBooth", "AdamW8bit", "fp16", True,
                             True, 2e-6, (2.3, 9.4), 4.6),
    "lora": Setting("LoRA rank 8, fp16", "LoRA", "AdamW", "fp16", False, True, 1e-4, (4.8, 3.4), 12.0),
}  # fmt: skip
# SDXL: diffusers' train_dreambooth_lora_sdxl.py step (LoRA on the attention projections; the
# VAE in fp32, as that script runs it) and the same loop training the whole UNet.  No reference
# figures were measured for them: the comparison is the run's own.
SDXL_SETTINGS = {
    "sdxl-lora": Setting("SDXL LoRA rank 8, fp16, gradient checkpointing, 8-bit AdamW", "LoRA", "AdamW8bit", "fp16",
                         True, True, 1e-4, (0.0, 0.0), 0.0),
    "sdxl-dreambooth": Setting("SDXL DreamBooth (full UNet), fp16, gradient checkpointing, 8-bit AdamW", "DreamBooth",
                               "AdamW8bit", "fp16", True, True, 1e-5, (0.0, 0.0), 0.0),
}  # fmt: skip
# Flux.1: diffusers' train_dreambooth_lora_flux.py step (LoRA on the attention projections,
# text embeddings computed once, the image encoded every step, logit-normal timesteps, dev's
# guidance at 1), on the base as loaded and in 4 bits (Hugging Face's QLoRA recipe).  No
# reference figures were measured for them: the comparison is the run's own.
FLUX_SETTINGS = {
    "flux-lora": Setting("Flux.1 LoRA rank 8, bf16, gradient checkpointing, 8-bit AdamW", "LoRA", "AdamW8bit", "bf16",
                         True, True, 1e-4, (0.0, 0.0), 0.0),
    "flux-qlora": Setting("Flux.1 QLoRA (nf4 base) rank 8, bf16, gradient checkpointing, 8-bit AdamW", "LoRA",
                          "AdamW8bit", "bf16", True, True, 1e-4, (0.0, 0.0), 0.0, quantization="nf4"),
}  # fmt: skip
ALL_SETTINGS = {**SETTINGS, **SDXL_SETTINGS, **FLUX_SETTINGS}
LORA_RANK = 8


# --- one measurement (a child process) -----------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _windows(warmup: int, steps: int) -> list[int]:
    """The step counts at which timing marks are taken: after the first step, after the
    warm-up, then at the end of each window."""
    ends = [1 + warmup + round(steps * (w + 1) / WINDOWS) for w in range(WINDOWS)]
    return list(dict.fromkeys([1, 1 + warmup, *ends]))


def _rates(stops: list[int], marks: list[float], *, warmup: int) -> dict[str, Any]:
    """Steps/s of each timed window and their median (steadier on a shared machine than one
    long window, which a burst of other work can slow)."""
    first = stops.index(1 + warmup)
    windows = [(stops[i + 1] - stops[i]) / (marks[i + 1] - marks[i]) for i in range(first, len(stops) - 1)]
    ordered = sorted(windows)
    return {"steps_per_s": ordered[len(ordered) // 2], "window_steps_per_s": windows}


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def textbook(job: dict[str, Any], setting: Setting, *, warmup: int, steps: int) -> dict[str, Any]:
    """diffusers' DreamBooth example loop, as a plain script has it."""

    import torch
    import torch.nn.functional as F  # noqa: N812
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from finetune_trainer import data

    model, device = Path(job["model"]), job["device"]
    precision = setting.precision if device == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    if setting.method == "LoRA":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_RANK,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if setting.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if setting.optimizer == "AdamW8bit":
        import bitsandbytes

        optimizer: Any = bitsandbytes.optim.AdamW8bit(params, lr=setting.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=setting.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.train()
    # What a data loader hands over: normalised pixels of each photo, and the prompt.
    folder = data.load_folder(Path(job["images"]), prompt=PROMPT, resolution=job["resolution"], field_name="images")
    pixels = [data.crop_and_flip(e.pixels, job["resolution"], center=True, flip=False) for e in folder.examples]

    stops = _windows(warmup, steps)
    marks: list[float] = []
    for step in range(1 + warmup + steps):
        pixel_values = pixels[step % len(pixels)][None].to(accelerator.device, dtype=weight_dtype)
        input_ids = tokenizer(
            [PROMPT], padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids.to(accelerator.device)
        with accelerator.accumulate(unet):
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            ).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids)[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=setting.set_grads_to_none)
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}  # a progress bar's
        if step + 1 in stops:
            _sync(device)
            marks.append(time.perf_counter())
    return {
        **_rates(stops, marks, warmup=warmup),
        "first_step_s": marks[0] - STARTED,
        "peak_bytes": _peak(device),
        "last_loss": logs["loss"],
        "choices": {"mixed_precision": precision, "optimizer": setting.optimizer, "attention": "sdpa"},
    }


def textbook_sdxl(job: dict[str, Any], setting: Setting, *, warmup: int, steps: int) -> dict[str, Any]:
    """diffusers' SDXL DreamBooth LoRA example loop, as a plain script has it: both text
    encoders every step, the pooled embedding and the size-and-crop time ids."""

    import torch
    import torch.nn.functional as F  # noqa: N812
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from finetune_trainer import data

    model, device = Path(job["model"]), job["device"]
    precision = setting.precision if device == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    tokenizers = [
        CLIPTokenizer.from_pretrained(model / "tokenizer"),
        CLIPTokenizer.from_pretrained(model / "tokenizer_2"),
    ]
    encoders = [
        CLIPTextModel.from_pretrained(model / "text_encoder"),
        CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2"),
    ]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vae.requires_grad_(False)
    for encoder in encoders:
        encoder.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    if setting.method == "LoRA":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_RANK,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        for parameter in unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if setting.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    if setting.optimizer == "AdamW8bit":
        import bitsandbytes

        optimizer: Any = bitsandbytes.optim.AdamW8bit(params, lr=setting.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=setting.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    vae.to(accelerator.device, dtype=torch.float32)  # the SDXL VAE overflows in fp16
    for encoder in encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    unet.train()
    resolution = job["resolution"]
    folder = data.load_folder(Path(job["images"]), prompt=PROMPT, resolution=resolution, field_name="images")
    pixels = [data.crop_and_flip(e.pixels, resolution, center=True, flip=False) for e in folder.examples]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=accelerator.device)

    stops = _windows(warmup, steps)
    marks: list[float] = []
    for step in range(1 + warmup + steps):
        pixel_values = pixels[step % len(pixels)][None].to(accelerator.device, dtype=torch.float32)
        with accelerator.accumulate(unet):
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.to(weight_dtype)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            ).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            hidden, pooled = [], None
            for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
                ids = tokenizer(
                    [PROMPT], padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt",
                ).input_ids.to(accelerator.device)  # fmt: skip
                out = encoder(ids, output_hidden_states=True)
                pooled = out[0]
                hidden.append(out.hidden_states[-2])
            added = {"text_embeds": pooled, "time_ids": time_ids.to(weight_dtype)}
            prediction = unet(noisy, timesteps, torch.cat(hidden, dim=-1), added_cond_kwargs=added).sample
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=setting.set_grads_to_none)
        logs = {"loss": loss.detach().item()}  # a progress bar's
        if step + 1 in stops:
            _sync(device)
            marks.append(time.perf_counter())
    return {
        **_rates(stops, marks, warmup=warmup),
        "first_step_s": marks[0] - STARTED,
        "peak_bytes": _peak(device),
        "last_loss": logs["loss"],
        "choices": {"mixed_precision": precision, "optimizer": setting.optimizer, "attention": "sdpa"},
    }


def textbook_flux(job: dict[str, Any], setting: Setting, *, warmup: int, steps: int) -> dict[str, Any]:
    """diffusers' Flux DreamBooth LoRA example loop, as a plain script has it (its QLoRA variant
    loads the transformer through BitsAndBytesConfig): the prompt encoded once by CLIP and T5,
    which are then deleted; the image through the VAE every step; sigmas looked up in the
    scheduler's schedule; the loss read back every step."""

    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    from finetune_trainer import data

    model, device = Path(job["model"]), job["device"]
    precision = setting.precision if device == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    tokenizer_one = CLIPTokenizer.from_pretrained(model / "tokenizer")
    tokenizer_two = T5Tokenizer.from_pretrained(model / "tokenizer_2")
    text_encoder_one = CLIPTextModel.from_pretrained(model / "text_encoder", dtype=weight_dtype)
    text_encoder_two = T5EncoderModel.from_pretrained(model / "text_encoder_2", dtype=weight_dtype)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    quantized = setting.quantization != "none" and device == "cuda"  # diffusers' quantizer wants a GPU
    if quantized:
        from diffusers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype)
        transformer = FluxTransformer2DModel.from_pretrained(
            model, subfolder="transformer", quantization_config=config, torch_dtype=weight_dtype
        )
    else:
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=weight_dtype)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    for frozen in (transformer, vae, text_encoder_one, text_encoder_two):
        frozen.requires_grad_(False)
    vae.to(accelerator.device, dtype=weight_dtype)
    if not quantized:
        transformer.to(accelerator.device, dtype=weight_dtype)
    text_encoder_one.to(accelerator.device)
    text_encoder_two.to(accelerator.device)
    if setting.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    for parameter in transformer.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    params = [p for p in transformer.parameters() if p.requires_grad]
    if setting.optimizer == "AdamW8bit":
        import bitsandbytes

        optimizer: Any = bitsandbytes.optim.AdamW8bit(params, lr=setting.learning_rate)
    else:
        optimizer = torch.optim.AdamW(params, lr=setting.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    with torch.no_grad():
        ids_one = tokenizer_one(
            [PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        length = min(int(tokenizer_two.model_max_length), 512)
        ids_two = tokenizer_two(
            [PROMPT], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = text_encoder_one(ids_one.to(accelerator.device), output_hidden_states=False).pooler_output
        hidden = text_encoder_two(ids_two.to(accelerator.device))[0]
        text_ids = torch.zeros(hidden.shape[1], 3, device=accelerator.device, dtype=weight_dtype)
    del text_encoder_one, text_encoder_two
    if device == "cuda":
        torch.cuda.empty_cache()
    transformer.train()
    resolution = job["resolution"]
    folder = data.load_folder(Path(job["images"]), prompt=PROMPT, resolution=resolution, field_name="images")
    pixels = [data.crop_and_flip(e.pixels, resolution, center=True, flip=False) for e in folder.examples]
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    guidance_embeds = accelerator.unwrap_model(transformer).config.guidance_embeds

    def get_sigmas(timesteps: Any, n_dim: int) -> Any:
        sigmas = noise_scheduler.sigmas.to(device=accelerator.device, dtype=torch.float32)
        schedule = noise_scheduler.timesteps.to(accelerator.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps.to(accelerator.device)]
        sigma = sigmas[indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    stops = _windows(warmup, steps)
    marks: list[float] = []
    for step in range(1 + warmup + steps):
        pixel_values = pixels[step % len(pixels)][None].to(accelerator.device, dtype=weight_dtype)
        with accelerator.accumulate(transformer):
            latents = vae.encode(pixel_values).latent_dist.sample()
            latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(weight_dtype)
            batch, channels, height, width = latents.shape
            image_ids = FluxPipeline._prepare_latent_image_ids(
                batch, height // 2, width // 2, accelerator.device, weight_dtype
            )
            noise = torch.randn_like(latents)
            u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=0.0, logit_std=1.0)
            indices = (u * noise_scheduler.config.num_train_timesteps).long()
            timesteps = noise_scheduler.timesteps[indices].to(device=accelerator.device)
            sigmas = get_sigmas(timesteps, latents.ndim).to(latents.dtype)
            noisy = (1.0 - sigmas) * latents + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
            guidance = torch.ones(batch, device=accelerator.device) if guidance_embeds else None
            prediction = transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=hidden,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            prediction = FluxPipeline._unpack_latents(prediction, height * vae_scale, width * vae_scale, vae_scale)
            weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
            target = noise - latents
            loss = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(batch, -1), 1)
            loss = loss.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=setting.set_grads_to_none)
        logs = {"loss": loss.detach().item()}  # a progress bar's
        if step + 1 in stops:
            _sync(device)
            marks.append(time.perf_counter())
    return {
        **_rates(stops, marks, warmup=warmup),
        "first_step_s": marks[0] - STARTED,
        "peak_bytes": _peak(device),
        "last_loss": logs["loss"],
        "choices": {
            "mixed_precision": precision,
            "optimizer": setting.optimizer,
            "attention": "sdpa",
            "base_quantization": setting.quantization if quantized else "none",
        },
    }


def trainer(job: dict[str, Any], setting: Setting, *, warmup: int, steps: int) -> dict[str, Any]:
    """``DreamBoothRecipe`` from a manifest with the same settings; its own train loop."""
    from finetune_api.v1alpha1 import parse_manifest
    from finetune_trainer.report import ProgressReporter
    from finetune_trainer.train import DreamBoothRecipe

    device = job["device"]
    training: dict[str, Any] = {
        "maxSteps": 1 + warmup + steps,
        "batchSize": 1,
        "learningRate": setting.learning_rate,
        "optimizer": setting.optimizer,
        "mixedPrecision": setting.precision,
        "attention": "sdpa",
        "gradientCheckpointing": setting.gradient_checkpointing,
        "seed": 0,
    }
    if job["compile"] != "auto":
        training["compile"] = job["compile"] == "on"
    if setting.method == "LoRA":
        # The textbook scripts' layers (the attention projections), so both train the same weights.
        training["lora"] = {"rank": LORA_RANK, "alpha": LORA_RANK, "targets": "attention"}
    if job["family"] == "flux":
        # bf16 runs as fp32 on a CPU, as the textbook's does; nf4 falls back there with a warning.
        training["mixedPrecision"] = setting.precision if device == "cuda" else "no"
        training["baseQuantization"] = setting.quantization
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "method": setting.method,
            "baseModel": {"uri": job["model"], "type": {"sdxl": "sdxl", "flux": "flux1"}.get(job["family"], "v1x")},
            "dataset": {
                "instanceImages": job["images"],
                "instancePrompt": PROMPT,
                "resolution": job["resolution"],
                "centerCrop": True,
            },
            "training": training,
            "output": {"uri": job["output"]},
        },
    }
    recipe = DreamBoothRecipe(parse_manifest(manifest), reporter=ProgressReporter(job="bench"))
    try:
        recipe.setup()
        stops, marks = _windows(warmup, steps), []
        # The recipe's own loop, stopped at each timing mark: each stop reads the losses
        # back, as a progress report would.
        for stop in stops:
            recipe.total_steps = stop
            recipe.train()
            _sync(device)
            marks.append(time.perf_counter())
        return {
            **_rates(stops, marks, warmup=warmup),
            "first_step_s": marks[0] - STARTED,
            "peak_bytes": _peak(device),
            "last_loss": recipe.history[-1][1],
            "choices": dict(recipe.reporter.settings),
            "warnings": list(recipe.reporter.warnings),
        }
    finally:
        recipe.cleanup()


def child(job: dict[str, Any]) -> None:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    setting = ALL_SETTINGS[job["setting"]]
    textbooks = {"sdxl": textbook_sdxl, "flux": textbook_flux}
    run = trainer if job["variant"] == "trainer" else textbooks.get(job["family"], textbook)
    result = run(job, setting, warmup=job["warmup"], steps=job["steps"])
    print("RESULT " + json.dumps(result))


# --- the comparison ------------------------------------------------------------------------------


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(job: dict[str, Any], *, timeout_s: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FINETUNE_REPORT_URL", None)
    env["FINETUNE_TERMINATION_LOG"] = os.devnull
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    tail = (completed.stderr or completed.stdout)[-3000:]
    raise SystemExit(f"{job['variant']} / {job['setting']} failed (exit {completed.returncode}):\n{tail}")


def build_model(folder: Path, *, model: str) -> Path:
    from finetune_trainer.tiny import (
        build_random_pipeline,
        build_tiny_flux_pipeline,
        build_tiny_pipeline,
        build_tiny_sdxl_pipeline,
    )

    if model == "sd15":
        return build_random_pipeline(folder, model_type="v1x")
    if model == "sdxl":
        return build_random_pipeline(folder, model_type="sdxl")
    if model == "flux1":
        return build_random_pipeline(folder, model_type="flux1")
    if model == "tiny-flux":
        return build_tiny_flux_pipeline(folder)
    return build_tiny_sdxl_pipeline(folder) if model == "tiny-sdxl" else build_tiny_pipeline(folder)


def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GB"


def short_choices(choices: dict[str, str]) -> str:
    precision = choices.get("mixed_precision", "?")
    optimizer = choices.get("optimizer", "?") + (" (fused)" if choices.get("fused_optimizer") == "true" else "")
    parts = ["fp32" if precision == "no" else precision, optimizer]
    if choices.get("base_quantization", "none") != "none":
        parts.append(f"{choices['base_quantization']} base")
    if choices.get("channels_last") == "true":
        parts.append("channels_last")
    if choices.get("compile") == "true":
        parts.append(f"compiled ({choices.get('compile_mode', 'default')}, {choices.get('compile_seconds', '?')} s)")
    else:
        parts.append("not compiled")
    return ", ".join(parts)


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# Trainer step vs. a textbook DreamBooth step",
        "",
        "Written by `bench/trainer_step.py` (`make bench-trainer`, `BENCH_ARGS=--sd15`, `--sdxl`, `--flux`).",
        "Steps/s after the warm-up; first step: seconds from the start of the process to the end of the",
        "first step (imports, loading, caching and compiling included); peak: allocated GPU memory, or on",
        "a CPU the process's peak resident memory (Python and torch included). Batch 1, SDPA attention.",
        "Each variant runs in a process of its own; the trainer's step is its own training loop.",
    ]
    for run in runs:
        peak_kind = "allocated" if run["device"] == "cuda" else "RSS"
        lines += [
            "",
            f"## {run['device_name']} ({run['device']}), {run['model']}, {run['resolution']} px",
            "",
            f"{run['date']}; torch {run['torch']}; {run['warmup']} warm-up + {run['steps']} timed steps "
            f"(median of {WINDOWS} windows; best of {run.get('rounds', 1)} alternating runs)"
            + (f"; {run['threads']} CPU thread(s)" if run["device"] == "cpu" else "")
            + f"; compile: {run['compile']}.",
            "",
            f"| setting | textbook steps/s | trainer steps/s | ratio | first step (s), textbook / trainer "
            f"| peak {peak_kind}, textbook / trainer | the trainer's choices |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in run["results"]:
            ours, theirs = row["trainer"], row["textbook"]
            lines.append(
                f"| {row['label']} | {theirs['steps_per_s']:.2f} | {ours['steps_per_s']:.2f} | {row['ratio']:.2f}x "
                f"| {theirs['first_step_s']:.1f} / {ours['first_step_s']:.1f} "
                f"| {gib(theirs['peak_bytes'])} / {gib(ours['peak_bytes'])} | {short_choices(ours['choices'])} |"
            )
        if run["device"] == "cuda" and run["model"] == "sd15":
            lines += [
                "",
                "The issue's reference (diffusers' scripts, one H100) and targets:",
                "",
                "| setting | reference steps/s | reference peak | target | met |",
                "|---|---|---|---|---|",
            ]
            for row in run["results"]:
                setting = ALL_SETTINGS[row["setting"]]
                ours = row["trainer"]
                met = ours["steps_per_s"] >= setting.target_steps_per_s and ours["peak_bytes"] <= setting.reference[
                    1
                ] * (10**9)
                lines.append(
                    f"| {setting.label} | {setting.reference[0]} | {setting.reference[1]} GB "
                    f"| >= {setting.target_steps_per_s} steps/s at <= {setting.reference[1]} GB "
                    f"| {'yes' if met else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's architecture (random weights) at 512 px")
    parser.add_argument(
        "--sdxl",
        action="store_true",
        help="SDXL's architecture (random weights) at 1024 px on a GPU; on a CPU the tiny SDXL pipeline at 64 px",
    )
    parser.add_argument(
        "--flux",
        action="store_true",
        help="Flux.1-dev's architecture (random weights) at 1024 px on a GPU; on a CPU the tiny Flux pipeline at 64 px",
    )
    parser.add_argument("--settings", help=f"comma-separated, of {', '.join(ALL_SETTINGS)}")
    parser.add_argument("--steps", type=int, help="timed steps (default 100; 280 with --sd15)")
    parser.add_argument("--warmup", type=int, help="steps before timing (default 5; 20 with --sd15)")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        help="the trainer's spec.training.compile (default: on with a GPU, as a long run gets it; else auto)",
    )
    parser.add_argument("--threads", type=int, help="torch threads on a CPU (default 1: steadier on a shared machine)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="runs of each variant, in alternating order; the best counts (default 2; 1 with --sd15)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for trainer-step.json and .md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    family = "flux" if args.flux else "sdxl" if args.sdxl else "sd"
    full_size = args.sd15 or ((args.sdxl or args.flux) and device == "cuda")
    if args.flux:
        model_name = "flux1" if device == "cuda" else "tiny-flux"
    elif args.sdxl:
        model_name = "sdxl" if device == "cuda" else "tiny-sdxl"
    else:
        model_name = "sd15" if args.sd15 else "tiny"
    default_settings = FLUX_SETTINGS if args.flux else SDXL_SETTINGS if args.sdxl else SETTINGS
    names = [s.strip() for s in (args.settings or ",".join(default_settings)).split(",") if s.strip()]
    unknown = [n for n in names if n not in default_settings]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(default_settings)}")
    resolution = {"sd15": 512, "sdxl": 1024, "flux1": 1024}.get(model_name, 64)
    steps = args.steps or (280 if args.sd15 else 100)
    warmup = args.warmup if args.warmup is not None else (20 if full_size else 5)
    compile_ = args.compile or ("on" if device == "cuda" else "auto")
    threads = 0 if device == "cuda" else (args.threads or 1)
    rounds = args.rounds or (1 if full_size else 2)
    run: dict[str, Any] = {
        "device": device,
        "device_name": device_name(device),
        "model": model_name,
        "resolution": resolution,
        "batch_size": 1,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "warmup": warmup,
        "steps": steps,
        "threads": threads,
        "compile": compile_,
        "rounds": rounds,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        from finetune_trainer.tiny import write_demo_images

        print(f"building the {run['model']} pipeline ...", flush=True)
        model = build_model(Path(tmp) / "model", model=model_name)
        images = Path(tmp) / "images"
        write_demo_images(images, IMAGES, resolution)
        for name in names:
            row: dict[str, Any] = {"setting": name, "label": ALL_SETTINGS[name].label}
            measured: dict[str, list[dict[str, Any]]] = {"textbook": [], "trainer": []}
            for round_ in range(rounds):
                # Alternating order (ABBA): a machine that slows down or speeds up during the
                # run favours neither.
                order = ("textbook", "trainer") if round_ % 2 == 0 else ("trainer", "textbook")
                for variant in order:
                    job = {
                        "variant": variant,
                        "family": family,
                        "setting": name,
                        "model": str(model),
                        "images": str(images),
                        "output": str(Path(tmp) / f"out-{name}-{round_}"),
                        "resolution": resolution,
                        "device": device,
                        "warmup": warmup,
                        "steps": steps,
                        "compile": compile_,
                        "threads": threads,
                    }
                    result = measure(job, timeout_s=3600)
                    measured[variant].append(result)
                    print(
                        f"{name:14} {variant:9} {result['steps_per_s']:7.2f} steps/s  first step "
                        f"{result['first_step_s']:6.1f} s  peak {gib(result['peak_bytes'])}",
                        flush=True,
                    )
            for variant, results in measured.items():
                # The best round: other work on the machine only ever slows a run down.
                row[variant] = {
                    **max(results, key=lambda r: r["steps_per_s"]),
                    "rounds_steps_per_s": [r["steps_per_s"] for r in results],
                }
            row["ratio"] = row["trainer"]["steps_per_s"] / row["textbook"]["steps_per_s"]
            run["results"].append(row)

    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "trainer-step.json"
    runs: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        runs = json.loads(path.read_text())["runs"]
    runs = [r for r in runs if (r["device_name"], r["model"]) != (run["device_name"], run["model"])] + [run]
    path.write_text(json.dumps({"runs": runs, "settings": {k: asdict(v) for k, v in ALL_SETTINGS.items()}}, indent=2))
    (args.results / "trainer-step.md").write_text(markdown(runs))
    print(markdown([run]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
