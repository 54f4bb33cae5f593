"""Flux.1 (Black Forest Labs' dev and schnell): a 12 B-parameter rectified-flow transformer
conditioned on T5-XXL's hidden states and CLIP ViT-L's pooled embedding, trained as diffusers'
``train_dreambooth_lora_flux.py`` trains it, on a base that may be quantized (QLoRA).

Supports:
- ``flux1``: dev (the guidance embedding, a distilled guidance scale) and schnell (none), told
  apart by the model itself; 1024 px and aspect-ratio buckets by default;
- ``method: LoRA`` on the transformer (kohya's layers by default: every linear of the double-
  and single-stream blocks; ``attention``: diffusers' script's q, k, v and output projections),
  optionally on the CLIP text encoder (``lora.trainTextEncoder``; T5 stays frozen, as in
  diffusers' script);
- flow matching: the image's latents (VAE shift and scale applied) mixed with noise at sigma,
  ``(1 - sigma) x + sigma noise``, the velocity ``noise - x`` as the target; sigma drawn with
  ``training.timestepSampling`` (logit_normal, mode, uniform: diffusers' densities) from the
  slot's own generator and shifted as the scheduler shifts it at inference (dev: by the image's
  token count, ``exp(mu)``; schnell: its static shift, 1); latents packed into 2 x 2 patches
  with their image ids; dev's guidance embedding at 1, as diffusers' and Hugging Face's QLoRA
  examples train it (``--guidance_scale=1``);
- ``training.baseQuantization``: the frozen transformer in int8 or nf4 through diffusers'
  ``BitsAndBytesConfig``; the adapters stay fp32;
- a diffusers folder, ``hf://``, or the transformer as one original-layout file (BFL's
  ``flux1-dev.safetensors``, also under ComfyUI's ``model.diffusion_model.``) with its text
  encoders, tokenizers, VAE and scheduler from ``spec.baseModel.componentsUri``;
- text embeddings computed once with only the text encoders on the GPU; then they leave it (and
  host memory: nothing is left to encode) before the transformer arrives, and samples render
  from the cached embeddings through ``FluxPipeline``;
- exports: LoRA in diffusers' layout (``transformer.*.lora_A/B``) and in kohya's / ComfyUI's
  (``lora_unet_double_blocks_*``, ``lora_unet_single_blocks_*`` with the original module names;
  a fused original linear gets the concatenated downs and a block-diagonal up, its alpha times
  the parts, so that up x down x alpha / rank is unchanged).

Refuses: method DreamBooth (the API does), ``output.mergeLoRA`` (no full-model export: a merged
Flux.1 is 24 GB; load the LoRA onto the base), a resolution not a multiple of 16 (latents are
packed 2 x 2), an SD/SDXL model declared flux1 and the reverse, a single file without
``componentsUri``, and a run that cannot fit the GPU (before any download), naming the settings
that would.

Memory it rests on (see ``memory_needed`` and the trainer README's table): Hugging Face's Flux
QLoRA post (FLUX.1-dev, 1024 px, rank 4 on the attention projections, batch 1, gradient
checkpointing, 8-bit AdamW, cached latents and text embeddings: 9 GB peak in nf4, 26 GB in
bf16); SimpleTuner's rank-16 LoRA on every layer: a bit over 30 GB in bf16, 18 GB int8, 9 GB
nf4; diffusers' README: rank 16 with every component trained over 40 GB.  Parameter counts
(the shipped configs reproduce them): transformer 11,901 M (dev; schnell 11,891 M), T5-XXL
encoder 4,762 M, CLIP ViT-L 123 M, VAE 84 M.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import FineTuneJobSpec, LoRATargets, ModelType, TimestepSampling
from finetune_trainer import flux_layout
from finetune_trainer.errors import BadInput
from finetune_trainer.families.base import (
    CONFIGS,
    FIELD,
    TYPE_FIELD,
    BaseModel,
    Conditioning,
    LoadOptions,
    MemoryEstimate,
    ModelFamily,
    Objective,
    Prediction,
    ema_bytes,
    read_json,
)

if TYPE_CHECKING:
    import torch

    from finetune_api.v1alpha1 import Training
    from finetune_trainer.buckets import Bucket

COMPONENTS_FIELD = "spec.baseModel.componentsUri"
QUANTIZATION_FIELD = "spec.training.baseQuantization"

TRANSFORMER_PARAMS = 11.901e9
T5_PARAMS = 4.762e9
CLIP_PARAMS = 123e6
VAE_PARAMS = 84e6
# LoRA parameters per unit of rank on Flux.1's transformer: r x (in + out) summed over the
# adapted linears (19 double-stream blocks of width 3072 with 4x MLPs, 38 single-stream ones).
# attention: 4.67 M at rank 4, the figure of Hugging Face's QLoRA post.
LORA_PER_RANK = {LoRATargets.KOHYA: 5_369_856, LoRATargets.ATTENTION: 1_167_360}
CLIP_LORA_PER_RANK = {LoRATargets.KOHYA: 165_888, LoRATargets.ATTENTION: 73_728}
# Bytes per transformer parameter: bitsandbytes' LLM.int8 keeps a byte and a scale per row;
# nf4 keeps half a byte and an fp32 absolute maximum per 64 (6.7 GB for Flux.1).
QUANTIZED_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}
# Activations of one 1024 px image (4,096 image and 512 text tokens) through the transformer
# in bf16 with gradient checkpointing: what is left of Hugging Face's QLoRA peaks once the
# weights are counted (9 GB - 6.7 GB nf4; 26 GB - 23.8 GB bf16).  Without checkpointing, about
# 34 bytes x tokens x width a layer (Korthikanti et al., fused attention) over 57 blocks.
ACTIVATIONS_1024_CHECKPOINTED = 2.2e9
ACTIVATIONS_1024_FULL = 34 * 4608 * 3072 * 57
TOKENS_1024 = 4096 + 512
# T5's window (Flux.1-dev's tokenizer_2; FluxPipeline's max_sequence_length at most).
MAX_T5_TOKENS = 512
# dev's guidance embedding while training (diffusers' README and Hugging Face's QLoRA examples
# train at 1: the LoRA then works at any guidance at inference).
TRAINING_GUIDANCE = 1.0
# diffusers' defaults for the densities (train_dreambooth_lora_flux.py).
LOGIT_MEAN, LOGIT_STD, MODE_SCALE = 0.0, 1.0, 1.29
GIB = 2**30
_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class Flux(ModelFamily):
    name = "Flux.1"
    model_types = (ModelType.FLUX1,)
    pipeline_class = "FluxPipeline"
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    kohya_text_prefixes = ("lora_te1",)  # CLIP; kohya's Flux files call T5 lora_te3
    denoiser_part = "transformer"
    adapted_text_encoders = (0,)
    single_file_is_denoiser = True
    text_encoders_leave_gpu = True
    # FluxPipeline's default for dev; schnell ignores it.
    sample_guidance = 3.5
    # A 12 B transformer against an 0.86 B UNet.
    pass_cost = 14.0
    kohya_network_module = "networks.lora_flux"

    # --- loading ---------------------------------------------------------------------------------

    def hub_patterns(self) -> list[str]:
        return ["model_index.json", *(f"{p}/*" for p in _PARTS)]

    def component_patterns(self) -> list[str]:
        # Everything but the transformer's weights (its config says the architecture).
        parts = [p for p in _PARTS if p != "transformer"]
        return ["model_index.json", "transformer/config.json", *(f"{p}/*" for p in parts)]

    def load_folder(self, path: Path, *, model_type: ModelType, options: LoadOptions | None = None) -> BaseModel:
        options = options or LoadOptions()
        self._check_folder(path, with_transformer=True)
        base = self._components(path, model_type=model_type, options=options)
        config = read_json(path / "transformer" / "config.json")

        def load() -> Any:
            return _load_transformer(
                lambda **kwargs: _from_pretrained(path, **kwargs), options=options, config=config, what=str(path)
            )

        base.load_unet = load
        base.source = str(path)
        return base

    def load_original_file(
        self, path: Path, *, model_type: ModelType, components: Path | None, options: LoadOptions
    ) -> BaseModel:
        if components is None:
            raise BadInput(
                f"{path.name} is a single-file transformer: it has no text encoders, tokenizers, VAE or scheduler; "
                "set spec.baseModel.componentsUri to a diffusers Flux.1 folder (or hf://black-forest-labs/FLUX.1-dev) "
                "to take them from",
                field=COMPONENTS_FIELD,
            )
        self._check_folder(components, with_transformer=False)
        folder = converted_folder(path, scratch=options.scratch)
        if not (folder / "transformer" / WEIGHTS_FILE).is_file():
            self._convert(path, components=components, dest=folder)
        config = read_json(folder / "transformer" / "config.json")
        base = self._components(components, model_type=model_type, options=options)

        def load() -> Any:
            # From a diffusers folder, as a folder is read: diffusers' single-file loader places
            # nothing where device_map says (it reads onto the CPU, then dispatches there) and
            # refuses a bitsandbytes quantization of weights that are not quantized yet
            # (diffusers 0.42.1: "does not contain bitsandbytes__*"); from_pretrained does both.
            return _load_transformer(
                lambda **kwargs: _from_pretrained(folder, **kwargs), options=options, config=config, what=path.name
            )

        base.load_unet = load
        base.source = str(path)
        return base

    def _convert(self, path: Path, *, components: Path, dest: Path) -> None:
        """The original-layout file as a diffusers transformer folder (config and weights as the
        file has them), written once under the scratch folder; the checkpoint leaves host memory
        when it is written."""
        import json

        from safetensors.torch import save_file

        from finetune_trainer import storage
        from finetune_trainer.model import read_checkpoint

        checkpoint, _ = read_checkpoint(path)
        if not flux_layout.is_original(set(checkpoint)):
            raise BadInput(
                f"{path.name} is not a Flux.1 transformer in the original layout (no double_blocks.*, img_in, txt_in); "
                "give the transformer's own file (e.g. flux1-dev.safetensors) or a diffusers folder",
                field=FIELD,
            )
        guidance = flux_layout.has_guidance(set(checkpoint))
        converted, missing, leftover = flux_layout.from_original(checkpoint)
        del checkpoint
        if missing or leftover:
            listed = ", ".join((missing or leftover)[:3])
            raise BadInput(
                f"{path.name} is not a whole Flux.1 transformer: {len(missing)} weights missing, {len(leftover)} "
                f"not of Flux's layout (e.g. {listed})",
                field=FIELD,
            )
        # The architecture: the components folder's transformer config where it has one, else
        # Flux.1's (shipped); dev or schnell as the file says.
        config_root = components if (components / "transformer" / "config.json").is_file() else CONFIGS / "flux1"
        config = {**read_json(config_root / "transformer" / "config.json"), "guidance_embeds": guidance}
        config.setdefault("_class_name", "FluxTransformer2DModel")
        with storage.atomic_path(dest) as tmp:
            (tmp / "transformer").mkdir(parents=True)
            (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
            save_file(
                {k: v.contiguous() for k, v in converted.items()},
                str(tmp / "transformer" / WEIGHTS_FILE),
                metadata={"format": "pt", "source": path.name},
            )
        del converted

    def _check_folder(self, path: Path, *, with_transformer: bool) -> None:
        field = FIELD if with_transformer else COMPONENTS_FIELD
        if not path.is_dir():
            raise BadInput(f"{path} is not a folder: give a diffusers Flux.1 folder", field=field)
        index = path / "model_index.json"
        if index.is_file():
            found = read_json(index).get("_class_name")
            if found not in (None, "FluxPipeline"):
                fix = "sdxl" if found == "StableDiffusionXLPipeline" else "v1x, v2x-512 or v2x"
                raise BadInput(
                    f"flux1 does not match the model: {path} is a {found} folder; set spec.baseModel.type to {fix}",
                    field=TYPE_FIELD,
                )
        parts = _PARTS if with_transformer else tuple(p for p in _PARTS if p != "transformer")
        for part in parts:
            if not (path / part).is_dir():
                raise BadInput(f"{path} has no {part}/ folder: not a diffusers Flux.1 folder", field=field)

    def _components(self, path: Path, *, model_type: ModelType, options: LoadOptions) -> BaseModel:
        """Tokenizers, text encoders (in the run's precision, T5 never in fp16: its activations
        overflow it), the VAE (fp32) and the scheduler's config of a Flux folder."""
        import torch
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        dtype = options.dtype
        t5_dtype = torch.float32 if dtype == torch.float16 else dtype
        try:
            tokenizers = [
                CLIPTokenizer.from_pretrained(path / "tokenizer"),
                T5Tokenizer.from_pretrained(path / "tokenizer_2"),
            ]
            encoders = [
                CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype),
                T5EncoderModel.from_pretrained(path / "text_encoder_2", dtype=t5_dtype),
            ]
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path} could not be loaded as a Flux.1 pipeline: {exc}", field=FIELD) from None
        return BaseModel(
            unet=None,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
            model_type=model_type,
            source=str(path),
            quantized=options.quantization,
        )

    # --- text -------------------------------------------------------------------------------------

    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list[torch.Tensor]:
        clip, t5 = tokenizers
        return [
            clip(
                prompts, padding="max_length", max_length=clip.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids,
            t5(prompts, padding="max_length", max_length=t5_length(t5), truncation=True, return_tensors="pt").input_ids,
        ]

    def encode(self, text_encoders: list[Any], ids: list[Any]) -> Conditioning:
        """T5's hidden states and CLIP's pooled output, as ``FluxPipeline.encode_prompt`` makes
        them.  An encoder that has left the GPU reads its ids where it is."""
        clip, t5 = text_encoders
        device = ids[0].device
        pooled = clip(ids[0].to(_device_of(clip)), output_hidden_states=False).pooler_output
        hidden = t5(ids[1].to(_device_of(t5)), output_hidden_states=False)[0]
        return Conditioning(hidden.to(device), pooled.to(device))

    def prompt_window(self, tokenizers: list[Any]) -> tuple[Any, int]:
        # T5 reads the prompt (CLIP's 77 tokens give only the pooled embedding); it adds an end token.
        return tokenizers[1], t5_length(tokenizers[1]) - 1

    def prompt_inputs(self, conditioning: Conditioning) -> dict[str, Any]:
        assert conditioning.pooled is not None
        return {"prompt_embeds": conditioning.hidden[None], "pooled_prompt_embeds": conditioning.pooled[None]}

    def sample_options(self, base: BaseModel) -> dict[str, Any]:
        return {"max_sequence_length": t5_length(base.tokenizers[1])}

    def time_ids(
        self, *, original_size: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
    ) -> list[int] | None:
        return None

    # --- the objective ----------------------------------------------------------------------------

    def prediction_type(self, model_type: ModelType) -> str:
        return "flow_matching"

    def objective(
        self, base: BaseModel, training: Training, *, prediction_type: str, channels_last: bool, device: Any
    ) -> Objective:
        transformer = base.denoiser()
        return FlowMatching(
            scheduler_config=base.scheduler_config,
            shift_factor=float(base.vae.config.shift_factor or 0.0),
            scaling_factor=float(base.vae.config.scaling_factor),
            vae_scale=2 ** (len(base.vae.config.block_out_channels) - 1),
            density=str(training.timestep_sampling or TimestepSampling.LOGIT_NORMAL),
            guidance=TRAINING_GUIDANCE if transformer.config.guidance_embeds else None,
        )

    def set_attention(self, unet: Any, attention: str) -> None:
        # Flux's attention runs through diffusers' attention dispatcher, PyTorch's SDPA by default
        # (job.resolve_settings has said so where another was asked for).
        return None

    # --- LoRA ---------------------------------------------------------------------------------------

    def lora_targets(self, targets: LoRATargets) -> tuple[tuple[str, ...] | str, tuple[str, ...]]:
        from finetune_trainer import lora

        return FLUX_TARGETS[targets], lora.TEXT_ENCODER_TARGETS[targets]

    def kohya_unet_layers(
        self, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], unet: Any, *, alpha: float
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The original layout's modules (ComfyUI and kohya name them so): a fused linear (q, k, v;
        a single block's q, k, v and MLP input) gets one layer whose down is the parts' downs one
        after the other and whose up is block-diagonal, with ``parts x alpha`` over ``parts x rank``
        (so up x down x alpha / rank is each part's own); a part without an adapter is zeros.
        diffusers' kohya-Flux converter splits such a layer back into the parts' adapters."""
        import torch

        where = flux_layout.original_modules(
            len(unet.transformer_blocks), len(unet.single_transformer_blocks), guidance=unet.config.guidance_embeds
        )
        grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, pair in adapters.items():
            original, index, _ = where[module]
            grouped.setdefault(original, {})[index] = pair
        out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for original, parts in grouped.items():
            name = original.replace(".", "_")
            members = _parts_of(where, original)
            if len(members) == 1:
                down, up = parts[0]
                out[name] = (down, up, alpha)
                continue
            like = next(iter(parts.values()))[0]
            rank, width = like.shape
            downs, ups = [], []
            for index, member in enumerate(members):
                if index in parts:
                    down, up = parts[index]
                else:
                    # Beside the trained parts, wherever they are (the GPU at the end of a run).
                    down = torch.zeros(rank, width, dtype=like.dtype, device=like.device)
                    features = unet.get_submodule(member).out_features
                    up = torch.zeros(features, rank, dtype=like.dtype, device=like.device)
                downs.append(down)
                ups.append(up)
            out[name] = (torch.cat(downs, dim=0), torch.block_diag(*ups), alpha * len(members))
        return out

    # --- pipelines and exports -----------------------------------------------------------------------

    def pipeline_parts(
        self, *, base: BaseModel, unet: Any, text_encoders: list[Any], vae: Any | None = None
    ) -> dict[str, Any]:
        from diffusers import FlowMatchEulerDiscreteScheduler

        clip, t5 = text_encoders
        return {
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config),
            "vae": vae if vae is not None else base.vae,
            "text_encoder": clip,
            "text_encoder_2": t5,
            "tokenizer": base.tokenizers[0],
            "tokenizer_2": base.tokenizers[1],
            "transformer": unet,
        }

    def architecture(self, model_type: ModelType, *, base: BaseModel | None = None) -> str:
        schnell = base is not None and base.unet is not None and not base.unet.config.guidance_embeds
        return "flux-1-schnell" if schnell else "flux-1-dev"

    def kohya_base_version(self, model_type: ModelType) -> str:
        return "flux1"

    def original_state_dict(
        self, *, model_type: ModelType, unet: Any, vae: Any, text_encoders: list[Any], extras: dict[str, Any]
    ) -> Any:
        raise BadInput(
            "a Flux.1 LoRA is not merged into a single full-model file here; load the LoRA onto the base",
            field="spec.output.mergeLoRA",
        )

    # --- memory ---------------------------------------------------------------------------------------

    def memory_needed(self, spec: FineTuneJobSpec, *, mixed_precision: str, optimizer: str) -> MemoryEstimate:
        """The larger of two moments: the prompts being encoded (T5-XXL, CLIP and the VAE on the
        GPU, the transformer not yet there), and training (the transformer's weights as quantized,
        the adapters' fp32 weights, gradients and AdamW state, the activations of the batch, the
        VAE, and the text encoders where they stay: lora.trainTextEncoder or shuffleCaption)."""
        training, lora_settings = spec.training, spec.lora
        low = 2 if mixed_precision in ("fp16", "bf16") else 4
        quantization = str(training.base_quantization)
        weights = TRANSFORMER_PARAMS * QUANTIZED_BYTES.get(quantization, low)
        targets = LoRATargets(lora_settings.targets)
        adapted = LORA_PER_RANK[targets] + (CLIP_LORA_PER_RANK[targets] if lora_settings.train_text_encoder else 0)
        state = 2 if optimizer == "AdamW8bit" else 8  # AdamW's two moments per parameter
        adapters = adapted * lora_settings.rank * (4 + 4 + state + ema_bytes(spec))
        tokens = (spec.resolution / 16) ** 2 + MAX_T5_TOKENS
        scale = tokens / TOKENS_1024 * training.batch_size * (2 if spec.dataset.prior_preservation else 1)
        activations = ACTIVATIONS_1024_CHECKPOINTED if training.gradient_checkpointing else ACTIVATIONS_1024_FULL
        activations *= scale * (low / 2)
        vae = VAE_PARAMS * 4
        encoders = T5_PARAMS * (4 if low == 4 or mixed_precision == "fp16" else 2) + CLIP_PARAMS * low
        stays = lora_settings.train_text_encoder or spec.dataset.shuffle_caption
        training_peak = weights + adapters + activations + vae + (encoders if stays else 0)
        encoding_peak = encoders + vae
        kind = {"int8": "int8", "nf4": "nf4"}.get(quantization, "bf16/fp16" if low == 2 else "fp32")
        basis = (
            f"the 11.9 B-parameter transformer in {kind} ({weights / GIB:.1f} GiB), {spec.resolution} px "
            f"activations ({activations / GIB:.1f} GiB) and rank-{lora_settings.rank} adapters"
            + (", with T5-XXL and CLIP kept on the GPU" if stays else "")
            + (
                f"; encoding the prompts first takes {encoding_peak / GIB:.1f} GiB"
                if encoding_peak > training_peak
                else ""
            )
        )
        return MemoryEstimate(
            bytes=max(training_peak, encoding_peak),
            basis=basis,
            activations=activations if training_peak >= encoding_peak else 0.0,
        )


class FlowMatching(Objective):
    """Rectified flow as Flux trains (diffusers' ``train_dreambooth_lora_flux.py``): sigma from a
    density over (0, 1), shifted as the scheduler shifts it at inference; ``x_sigma = (1 -
    sigma) x + sigma noise``; the transformer sees the packed latents with their image ids, T5's
    hidden states with zero text ids, CLIP's pooled embedding, sigma as its timestep and dev's
    guidance; it predicts the velocity ``noise - x``; every example weighs the same (the loss
    weighting diffusers pairs with these densities is 1)."""

    def __init__(
        self,
        *,
        scheduler_config: dict[str, Any],
        shift_factor: float,
        scaling_factor: float,
        vae_scale: int,
        density: str,
        guidance: float | None,
    ) -> None:
        self.config = scheduler_config
        self.shift_factor = shift_factor
        self.scaling_factor = scaling_factor
        self.vae_scale = vae_scale
        self.density = density
        self.guidance = guidance
        self._ids: dict[tuple[int, int, str], torch.Tensor] = {}

    def shift(self, bucket: Bucket) -> float:
        """The scheduler's shift at this size: FluxPipeline's exp(mu) from the image's token count
        where the scheduler shifts dynamically (dev), else its static shift (schnell: 1)."""
        config = self.config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        patch = self.vae_scale * 2
        tokens = (bucket.height // patch) * (bucket.width // patch)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (max_shift - base_shift) / (max_len - base_len)
        return math.exp(base_shift + slope * (tokens - base_len))

    def draw(self, gen: torch.Generator, bucket: Bucket) -> float:
        import torch

        if self.density == TimestepSampling.LOGIT_NORMAL:
            u = float(torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(1, generator=gen)))
        else:
            u = float(torch.rand(1, generator=gen))
            if self.density == TimestepSampling.MODE:
                u = 1 - u - MODE_SCALE * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
        shift = self.shift(bucket)
        return shift * u / (1 + (shift - 1) * u)

    def predict(
        self,
        model: Any,
        *,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        time_ids: torch.Tensor | None,
    ) -> Prediction:
        import torch
        from diffusers import FluxPipeline

        x = (latents - self.shift_factor) * self.scaling_factor
        sigmas = timesteps.to(x.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x + sigmas * noise
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=x.device, dtype=x.dtype)
        text_ids = torch.zeros(conditioning.hidden.shape[1], 3, device=x.device, dtype=x.dtype)
        velocity = model(
            hidden_states=packed,
            # FluxPipeline passes timestep / 1000, which is sigma; the model multiplies by 1000.
            timestep=sigmas.flatten(),
            guidance=guidance,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.hidden,
            txt_ids=text_ids,
            img_ids=self._image_ids(height, width, x),
            return_dict=False,
        )[0]
        return Prediction(unpack(velocity, height, width), noise - x)

    def _image_ids(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """The packed latents' positions (row, column), as FluxPipeline makes them; one tensor per
        size, kept on the device."""
        from diffusers import FluxPipeline

        key = (height, width, str(like.device))
        if key not in self._ids:
            self._ids[key] = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, like.device, like.dtype)
        return self._ids[key]


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``FluxPipeline._pack_latents``: 2 x 2 patches back into channels x height x
    width latents."""
    batch, _, features = packed.shape
    channels = features // 4
    grid = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, height, width)


def t5_length(tokenizer: Any) -> int:
    """How many tokens T5 reads: the tokenizer's window, at most FluxPipeline's 512."""
    return int(min(int(tokenizer.model_max_length), MAX_T5_TOKENS))


def _parts_of(where: dict[str, tuple[str, int, int]], original: str) -> list[str]:
    parts = sorted((index, part) for part, (name, index, _) in where.items() if name == original)
    return [part for _, part in parts]


def _device_of(module: Any) -> Any:
    return next(module.parameters()).device


def bnb_config(quantization: str, compute_dtype: Any) -> Any:
    """diffusers' bitsandbytes config: LLM.int8, or 4-bit NF4 computing in the run's precision."""
    from diffusers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


# diffusers' name of a model's weights in its folder.
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def converted_folder(path: Path, *, scratch: str) -> Path:
    """Where the diffusers copy of the single file ``path`` is kept: one folder per file (its
    path, size and modification time), so a retry in the same pod, or on a node that keeps the
    cache, reads it again without converting."""
    import hashlib
    import tempfile

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(scratch) if scratch else Path(tempfile.gettempdir()) / "finetune-converted"
    return root / f"flux1-transformer-{key}"


def _from_pretrained(path: Path, **kwargs: Any) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kwargs)


# What a RuntimeError says when the file, not the machine, is at fault: torch's load_state_dict.
_INPUT_RUNTIME_ERRORS = ("Error(s) in loading state_dict", "size mismatch", "Missing key(s)", "Unexpected key(s)")


def is_input_error(exc: BaseException) -> bool:
    """Whether a failure to read the transformer is the input's: a file that is not there or
    not of Flux's shape (OSError, ValueError, a state dict that does not fit), not a CUDA error,
    a kernel of bitsandbytes that fails on this GPU or memory that runs out."""
    if isinstance(exc, (OSError, ValueError)):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError is a RuntimeError
        return False
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _INPUT_RUNTIME_ERRORS)


def _load_transformer(read: Any, *, options: LoadOptions, config: dict[str, Any], what: str) -> Any:
    """The transformer in the run's precision, read straight onto its device (never whole in host
    memory in fp32: 48 GB): quantized by diffusers' bitsandbytes loader where asked."""
    if config.get("_class_name") not in (None, "FluxTransformer2DModel"):
        raise BadInput(f"{what}: the transformer is a {config.get('_class_name')}, not Flux's", field=TYPE_FIELD)
    kwargs: dict[str, Any] = {"torch_dtype": options.dtype}
    if options.quantization != "none":
        kwargs["quantization_config"] = bnb_config(options.quantization, options.dtype)
    elif options.device != "cpu":
        kwargs["device_map"] = {"": options.device}
    try:
        transformer = read(**kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        if not is_input_error(exc):
            # A CUDA or bitsandbytes kernel error, out of memory: not the file's fault, and a
            # retry (on another node) may well succeed; the run's own handlers classify it.
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BadInput(
            f"{what}: the Flux transformer could not be loaded ({type(exc).__name__}: {first}); check "
            "spec.baseModel.uri and spec.baseModel.type",
            field=FIELD,
        ) from None
    transformer.requires_grad_(False)
    return transformer


_DOUBLE = (
    r"transformer_blocks\.\d+\.(norm1\.linear|norm1_context\.linear"
    r"|attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
)
_SINGLE = r"single_transformer_blocks\.\d+\.(norm\.linear|attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
# peft matches a regular expression against a module's whole path: kohya's layers are every
# linear of the double- and single-stream blocks (kohya's lora_flux: each Linear in
# DoubleStreamBlock and SingleStreamBlock), not the embedders or the final layer (whose
# proj_out a suffix would also match).  attention: diffusers' script's to_q, to_k, to_v and
# to_out.0, in both kinds of block.
FLUX_TARGETS: dict[LoRATargets, str] = {
    LoRATargets.KOHYA: f"({_DOUBLE}|{_SINGLE})",
    LoRATargets.ATTENTION: r"(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
}


FLUX = Flux()
