"""Stable Diffusion XL: a UNet conditioned on two text encoders (CLIP ViT-L and OpenCLIP
ViT-bigG, their penultimate hidden states side by side), the second one's pooled projection,
and each image's size and crop (the "micro-conditioning"), trained as diffusers'
``train_dreambooth_lora_sdxl.py`` trains it.

Supports:
- ``sdxl`` at 1024 px by default; DreamBooth (the full UNet; the text encoders optionally) and
  LoRA (the UNet; optionally both text encoders);
- time ids from each image's true original size and crop: (original height, original width,
  crop top, crop left, target height, target width), as diffusers' script computes them;
- the fast path: latents cached, and while the text encoders are frozen the prompt
  embeddings and pooled embeddings computed once (time ids are per image, so they are not);
- a diffusers folder, one original-layout (SGM) file, or ``hf://``; ``baseModel.vaeUri`` for a
  replacement VAE;
- exports: the diffusers folder, one ``.safetensors`` in the original SDXL layout
  (``model.diffusion_model.*``, ``conditioner.embedders.0.transformer.*``,
  ``conditioner.embedders.1.model.*``, ``first_stage_model.*``), LoRA in diffusers' layout and
  in kohya's SDXL layout (``lora_unet_input_blocks_*``, ``lora_te1_*``, ``lora_te2_*``).

The SDXL VAE overflows in fp16 (its activations exceed fp16's range: black or NaN images):
it runs in fp32 unless ``baseModel.vaeUri`` names a VAE that does not (such as the community's
"fp16-fix" VAE), and a warning on the resource says which.

Refuses: an SD 1.x/2.x model declared sdxl (and the reverse); a run that cannot fit the GPU
the pod has, before any download, naming settings that would.  Memory it rests on:
diffusers' SDXL README (LoRA at 1024 px under 16 GB with gradient checkpointing, 8-bit Adam
and xformers) and kohya's (LoRA 12-13 GB); a full-UNet DreamBooth holds the UNet's fp32
weights and gradients (2.6 B parameters: 10.3 GB each) and AdamW's state (8-bit: 5.1 GB;
fp32: 20.5 GB), so it needs a 40 GB or larger GPU.  Parameter counts: UNet 2,567 M, text
encoders 123 M and 695 M, VAE 84 M.
"""

from __future__ import annotations

from typing import Any

from finetune_api.v1alpha1 import FineTuneJobSpec, Method, ModelType
from finetune_trainer import convert
from finetune_trainer.errors import BadInput
from finetune_trainer.families.base import (
    TYPE_FIELD,
    BaseModel,
    Conditioning,
    MemoryEstimate,
    ModelFamily,
    check_prediction,
    ema_bytes,
)

UNET_PARAMS = 2.567e9
TEXT_PARAMS = (123e6, 695e6)
VAE_PARAMS = 84e6
# Activations of one 1024 px image through the UNet in bf16/fp16, with gradient checkpointing
# and without: what is left of diffusers' "LoRA under 16 GB" once the frozen weights are
# counted, and the usual factor of four for keeping every activation.
ACTIVATIONS_1024_CHECKPOINTED = 6.0e9
ACTIVATIONS_1024_FULL = 16.0e9
GIB = 2**30


class StableDiffusionXL(ModelFamily):
    name = "Stable Diffusion XL"
    model_types = (ModelType.SDXL,)
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_slots = convert.SDXL_TEXT
    kohya_text_prefixes = ("lora_te1", "lora_te2")
    vae_overflows_in_fp16 = True
    pipeline_options = {"add_watermarker": False}

    def text_model_class(self, part: str) -> Any:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel

    def check_folder(
        self, model_type: ModelType, *, unet_config: dict[str, Any], scheduler_config: dict[str, Any], what: str
    ) -> None:
        if unet_config.get("addition_embed_type") != "text_time":
            raise BadInput(
                f"sdxl does not match the model: {what} is an SD 1.x/2.x model (its UNet takes no size and pooled "
                "text conditioning); set spec.baseModel.type to v1x, v2x-512 or v2x",
                field=TYPE_FIELD,
            )
        self.check_prediction(model_type, scheduler_config.get("prediction_type"), what=what)

    def check_prediction(self, model_type: ModelType, prediction: Any, *, what: str) -> None:
        # SDXL base is epsilon; a v-prediction SDXL fine-tune is not trained here yet.
        if prediction == "v_prediction":
            raise BadInput(
                f"{what} is a v-prediction SDXL model, which this trainer does not train yet; use an epsilon SDXL "
                "model (SDXL base 1.0 and its fine-tunes)",
                field=TYPE_FIELD,
            )
        check_prediction(model_type, "epsilon", prediction, what=what, fix="sdxl")

    def hub_tokenizers_for(self, model_type: ModelType) -> tuple[tuple[str, str], ...]:
        repo = "stabilityai/stable-diffusion-xl-base-1.0"
        return ((repo, "tokenizer"), (repo, "tokenizer_2"))

    def encode(self, text_encoders: list[Any], ids: list[Any]) -> Conditioning:
        import torch

        first = text_encoders[0](ids[0], output_hidden_states=True)
        second = text_encoders[1](ids[1], output_hidden_states=True)
        # Both encoders' penultimate layer, side by side; the second's projection, pooled.
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(hidden, second.text_embeds)

    def time_ids(
        self, *, original_size: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
    ) -> list[int] | None:
        return [original_size[0], original_size[1], crop[0], crop[1], target[0], target[1]]

    def denoise(self, unet: Any, noisy: Any, timesteps: Any, conditioning: Conditioning, time_ids: Any) -> Any:
        added = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        return unet(noisy, timesteps, conditioning.hidden, added_cond_kwargs=added).sample

    def kohya_unet_name(self, module: str, unet_config: Any) -> str:
        # kohya's SDXL scripts name UNet modules as the original (SGM) model does.
        original = convert.unet_key_map([f"{module}.weight"], unet_config)[f"{module}.weight"]
        return original.removesuffix(".weight").replace(".", "_")

    def architecture(self, model_type: ModelType, *, base: BaseModel | None = None) -> str:
        return "stable-diffusion-xl-v1-base"

    def kohya_base_version(self, model_type: ModelType) -> str:
        return "sdxl_base_v1-0"

    def memory_needed(self, spec: FineTuneJobSpec, *, mixed_precision: str, optimizer: str) -> MemoryEstimate:
        training = spec.training
        low = 2 if mixed_precision in ("fp16", "bf16") else 4
        scale = (spec.resolution / 1024) ** 2 * training.batch_size * (2 if spec.dataset.prior_preservation else 1)
        activations = ACTIVATIONS_1024_CHECKPOINTED if training.gradient_checkpointing else ACTIVATIONS_1024_FULL
        activations *= scale * (low / 2)
        state = 2 if optimizer == "AdamW8bit" else 8  # bytes of AdamW's two moments per parameter
        text = sum(TEXT_PARAMS)
        if spec.method == Method.LORA:
            # The frozen model in the mixed precision; the adapters are a rounding error.  Pivotal
            # tuning keeps the text encoders in fp32 (their tables train).
            text_bytes = 4 if spec.training.lora is not None and spec.training.lora.new_tokens else low
            weights = UNET_PARAMS * low + text * text_bytes + VAE_PARAMS * 4
            basis = "the frozen SDXL weights and 1024 px activations (diffusers: LoRA fits 16 GB)"
        elif spec.method == Method.TEXTUAL_INVERSION:
            # The frozen UNet in the mixed precision, the text encoders in fp32 (their tables train).
            weights = UNET_PARAMS * low + text * 4 + VAE_PARAMS * 4
            basis = "the frozen SDXL UNet, fp32 text encoders and 1024 px activations"
        else:
            trained = UNET_PARAMS + (text if training.train_text_encoder else 0)
            frozen = 0 if training.train_text_encoder else text
            weights = trained * (4 + 4 + state + ema_bytes(spec)) + frozen * low + VAE_PARAMS * 4
            basis = "the UNet's fp32 weights, gradients and optimizer state (2.6 B parameters) and activations"
        return MemoryEstimate(bytes=weights + activations, basis=basis, activations=activations)


SDXL = StableDiffusionXL()
