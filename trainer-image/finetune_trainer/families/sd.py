"""Stable Diffusion 1.x and 2.x: a UNet conditioned on one CLIP (1.x) or OpenCLIP (2.x) text
encoder's last hidden states, trained as diffusers' ``train_dreambooth.py`` and
``train_dreambooth_lora.py`` train it.

Supports:
- ``v1x`` (512 px, epsilon), ``v2x-512`` (512 px, epsilon), ``v2x`` (768 px, v-prediction);
- DreamBooth (the full UNet, optionally the text encoder) and LoRA (UNet, optionally the text
  encoder);
- a diffusers folder, one original-layout ``.safetensors``/``.ckpt``, or ``hf://``; a single
  file's prediction type read from what it says (its ``.yaml``, metadata), a contradiction with
  the declared type refused;
- exports: the diffusers folder, one original-layout file (with its ``.yaml`` for 2.x, which
  the web UIs need to know a v-prediction model), LoRA in diffusers' and kohya's layouts.

Refuses: an SDXL file or folder declared as 1.x/2.x (and the reverse), a 1.x text encoder
declared 2.x, a scheduler trained for the other objective.

Memory it rests on (diffusers' DreamBooth README; kohya's docs; measured on an H100, see
ANCHORS): SD 1.5 DreamBooth at 512 px with fp16, 8-bit AdamW and gradient checkpointing about
9-12 GB; with the text encoder trained too about 24 GB; LoRA about 3.5 GB.  SD 1.x/2.x fit the
GPUs people train them on: no run is refused for memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_api.v1alpha1 import ModelType
from finetune_trainer import convert
from finetune_trainer.errors import BadInput
from finetune_trainer.families.base import TYPE_FIELD, BaseModel, Conditioning, ModelFamily, check_prediction

PREDICTION_TYPES = {ModelType.V1X: "epsilon", ModelType.V2X_512: "epsilon", ModelType.V2X: "v_prediction"}
_WIDTHS = {768: "v1x", 1024: "v2x"}  # cross-attention width of SD 1.x and 2.x
_ARCHITECTURES = {
    ModelType.V1X: "stable-diffusion-v1",
    ModelType.V2X_512: "stable-diffusion-v2-512",
    ModelType.V2X: "stable-diffusion-v2-768-v",
}


class StableDiffusion(ModelFamily):
    name = "Stable Diffusion"
    model_types = (ModelType.V1X, ModelType.V2X_512, ModelType.V2X)
    pipeline_class = "StableDiffusionPipeline"
    pipeline_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def slots_for(self, model_type: ModelType) -> tuple[convert.TextSlot, ...]:
        return convert.SD1_TEXT if model_type == ModelType.V1X else convert.SD2_TEXT

    def prediction_type(self, model_type: ModelType) -> str:
        return PREDICTION_TYPES[model_type]

    def check_folder(
        self, model_type: ModelType, *, unet_config: dict[str, Any], scheduler_config: dict[str, Any], what: str
    ) -> None:
        if unet_config.get("addition_embed_type") == "text_time":
            raise BadInput(
                f"{model_type} does not match the model: {what} is an SDXL model; set spec.baseModel.type to sdxl",
                field=TYPE_FIELD,
            )
        width = unet_config.get("cross_attention_dim")
        family = _WIDTHS.get(width) if isinstance(width, int) else None
        expected = "v1x" if model_type == ModelType.V1X else "v2x"
        if family is not None and family != expected:
            actual = "SD 1.x" if family == "v1x" else "SD 2.x"
            fix = "v1x" if family == "v1x" else "v2x-512 (512 px) or v2x (768 px)"
            raise BadInput(
                f"{model_type} does not match the model: {what} is an {actual} model (cross-attention width "
                f"{width}); set spec.baseModel.type to {fix}",
                field=TYPE_FIELD,
            )
        self.check_prediction(model_type, scheduler_config.get("prediction_type"), what=what)

    def check_prediction(self, model_type: ModelType, prediction: Any, *, what: str) -> None:
        fix = "v2x" if prediction == "v_prediction" else "v1x or v2x-512"
        check_prediction(model_type, PREDICTION_TYPES[model_type], prediction, what=what, fix=fix)

    def hub_tokenizers_for(self, model_type: ModelType) -> tuple[tuple[str, str], ...]:
        # The same BPE vocabulary; SD 2.x pads differently.
        if model_type == ModelType.V1X:
            return (("openai/clip-vit-large-patch14", ""),)
        return (("stabilityai/stable-diffusion-2", "tokenizer"),)

    def encode(self, text_encoders: list[Any], ids: list[Any]) -> Conditioning:
        return Conditioning(text_encoders[0](ids[0])[0])

    def architecture(self, model_type: ModelType, *, base: BaseModel | None = None) -> str:
        return _ARCHITECTURES[model_type]

    def kohya_base_version(self, model_type: ModelType) -> str:
        return {ModelType.V1X: "sd_v1", ModelType.V2X_512: "sd_v2", ModelType.V2X: "sd_v2_768_v"}[model_type]

    def extra_exports(self, *, trained: Any, single_file: Path) -> list[Path]:
        """SD 2.x: the original config beside the single file (the web UIs read it)."""
        if trained.base.model_type == ModelType.V1X:
            return []
        from finetune_trainer import original_config, storage

        config = original_config.original_config(
            unet=dict(trained.unet.config),
            vae=dict(trained.vae.config),
            v2=True,
            prediction_type=trained.base.prediction_type,
            scheduler=trained.base.scheduler_config,
        )
        dest = single_file.with_suffix(".yaml")
        storage.write_text_atomic(dest, original_config.dump(config))
        storage.make_readable(dest)
        return [dest]


SD = StableDiffusion()
