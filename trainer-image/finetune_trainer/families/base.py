"""What every model family provides to the recipe, and what the diffusion UNets share.

The recipe (``train.py``) is one for every family: it reads the images, caches latents and
prompt embeddings, steps the optimizer, saves checkpoints, renders samples and exports.  What
differs between model families is asked of the family:

- loading: a diffusers folder, a single original-layout file (``load_folder``,
  ``load_single_file``), and what to fetch of an ``hf://`` repository (``hub_patterns``);
- text conditioning: its tokenizers and text encoders, and how their outputs become the
  denoiser's conditioning (``encode``, ``denoise``), with SDXL's size and crop conditioning
  (``time_ids``);
- the objective: how a slot's timestep is drawn from its own generator, how latents are noised,
  what the model predicts and against which target, with which loss weights (``objective``:
  the UNet families' denoising objective here, ``DiffusionObjective``; Flux's flow matching in
  ``flux.py``);
- which layers get LoRA adapters (``lora_targets``), and the LoRA files' layouts;
- the pipelines that render class images and samples and that an export saves
  (``pipeline``);
- the single file's key layout and metadata (``original_state_dict``, ``architecture``);
- what memory a run needs (``memory_needed``), so that a job that cannot fit its GPU is
  refused before minutes of set-up;
- for a family too large to read in fp32 (Flux): its models in the run's precision
  (``LoadOptions``), the denoiser read on first use straight onto its device
  (``BaseModel.denoiser``), a single file that is the denoiser alone with the rest from
  ``spec.baseModel.componentsUri`` (``load_original_file``), and text encoders that leave the
  GPU once the prompts are encoded (``text_encoders_leave_gpu``, samples from the embeddings:
  ``prompt_inputs``).

A new family is a module with a subclass of ``ModelFamily`` and one line in ``FAMILIES``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import BaseModelSource, FineTuneJobSpec, LoRATargets, ModelType
from finetune_trainer import convert
from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    import torch

    from finetune_api.v1alpha1 import Training
    from finetune_trainer.buckets import Bucket

log = logging.getLogger("finetune_trainer")

FIELD = "spec.baseModel.uri"
TYPE_FIELD = "spec.baseModel.type"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_METADATA_KEY = "finetune.configs"


@dataclass
class BaseModel:
    """The pieces of a pipeline as training starts from them: in fp32 for the UNet families (see
    ``ModelFamily.load_folder``), in the run's precision for Flux, whose 12 B parameters would
    not fit a pod's memory in fp32.  ``unet`` is the denoiser: a UNet, or Flux's transformer."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    model_type: ModelType
    source: str  # where it was read from, for the log and the manifest
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # The VAE came from spec.baseModel.vaeUri rather than the model itself.
    vae_source: str | None = None
    # A denoiser read on first use (see ``denoiser``), straight onto its device: Flux's
    # transformer arrives on the GPU only after the text encoders have left it.
    load_unet: Callable[[], Any] | None = None
    # The frozen denoiser's weights are quantized (bitsandbytes): never cast, never moved.
    quantized: str = "none"

    def denoiser(self) -> Any:
        """The denoiser, read now if it was left for later."""
        if self.unet is None and self.load_unet is not None:
            self.unet = self.load_unet()
            self.load_unet = None
        return self.unet

    @property
    def family(self) -> ModelFamily:
        from finetune_trainer.families import family_of

        return family_of(self.model_type)

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self.model_type)

    @property
    def text_encoder(self) -> Any:
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]


@dataclass
class Conditioning:
    """What the text encoders give the denoiser for a batch of prompts."""

    hidden: torch.Tensor  # batch x tokens x width
    pooled: torch.Tensor | None = None  # SDXL: batch x width of the second encoder's projection

    def one(self, index: int) -> Conditioning:
        return Conditioning(self.hidden[index], None if self.pooled is None else self.pooled[index])


def stack(items: list[Conditioning]) -> Conditioning:
    import torch

    pooled = [c.pooled for c in items]
    return Conditioning(
        torch.stack([c.hidden for c in items]),
        torch.stack(pooled) if all(p is not None for p in pooled) else None,  # type: ignore[arg-type]
    )


class ModelFamily:
    """One family of models (a base class: see the module's docstring for what each part is)."""

    name = ""
    model_types: tuple[ModelType, ...] = ()
    # The diffusers pipeline class that samples, class images and the exported folder use.
    pipeline_class = ""
    # Subfolders of a diffusers folder: text encoders and tokenizers, in conditioning order.
    text_encoder_parts: tuple[str, ...] = ("text_encoder",)
    tokenizer_parts: tuple[str, ...] = ("tokenizer",)
    text_slots: tuple[convert.TextSlot, ...] = ()
    # The kohya-layout LoRA file's prefix for each text encoder.
    kohya_text_prefixes: tuple[str, ...] = ("lora_te",)
    # The VAE's activations overflow fp16: it runs in fp32 unless a replacement VAE is given.
    vae_overflows_in_fp16 = False
    # Pipeline arguments that are not models: no safety checker, no watermark.
    pipeline_options: dict[str, Any] = {}
    # The denoiser's name in a pipeline and in diffusers' LoRA files: unet, or transformer.
    denoiser_part = "unet"
    # Which text encoders get LoRA adapters with lora.trainTextEncoder (indices; all of them
    # for the UNet families).
    adapted_text_encoders: tuple[int, ...] | None = None
    # The model's original single file is the denoiser alone (Flux.1's transformer): the rest
    # comes from spec.baseModel.componentsUri (see load_original_file).
    single_file_is_denoiser = False
    # Once the prompts are encoded, the text encoders leave the GPU before the denoiser comes
    # (Flux's T5-XXL is 9.5 GB in bf16); samples then render from cached prompt embeddings.
    text_encoders_leave_gpu = False
    # The guidance scale samples use when spec.samples.guidanceScale is unset.
    sample_guidance = 7.5
    # The cost of one denoiser pass against an SD 1.5 UNet's, for the barrier timeout of a run
    # with several processes (sample rendering and class images on the main process alone).
    pass_cost = 1.0
    # The kohya-layout LoRA file's network module (its ss_network_module metadata).
    kohya_network_module = "networks.lora"

    # --- loading ---------------------------------------------------------------------------------

    def hub_patterns(self) -> list[str]:
        parts = ("unet", "vae", *self.text_encoder_parts, *self.tokenizer_parts, "scheduler")
        return ["model_index.json", *(f"{p}/*" for p in parts)]

    def slots_for(self, model_type: ModelType) -> tuple[convert.TextSlot, ...]:
        """Where each text encoder sits in a single file of this type."""
        return self.text_slots

    def hub_tokenizers_for(self, model_type: ModelType) -> tuple[tuple[str, str], ...]:
        """Where a single file's tokenizers come from when none lie beside it: (repository,
        subfolder) on the hub, one per tokenizer."""
        return ()

    def text_model_class(self, part: str) -> Any:
        from transformers import CLIPTextModel

        return CLIPTextModel

    def check_folder(
        self, model_type: ModelType, *, unet_config: dict[str, Any], scheduler_config: dict[str, Any], what: str
    ) -> None:
        """Refuse a folder of another family or objective, naming the type to set."""

    def check_prediction(self, model_type: ModelType, prediction: Any, *, what: str) -> None:
        """Refuse a model trained for another objective than ``model_type``'s."""
        check_prediction(model_type, self.prediction_type(model_type), prediction, what=what, fix=str(model_type))

    def load_folder(self, path: Path, *, model_type: ModelType, options: LoadOptions | None = None) -> BaseModel:
        """A diffusers folder, every part in fp32 (``options`` are for families whose models do
        not fit a pod's memory in fp32)."""
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTokenizer

        check_pipeline_class(path, self, model_type)
        for part in ("unet", "vae", *self.text_encoder_parts, *self.tokenizer_parts, "scheduler"):
            if not (path / part).is_dir():
                raise BadInput(f"{path} has no {part}/ folder: not a {self.name} pipeline folder", field=FIELD)
        scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
        unet_config = read_json(path / "unet" / "config.json")
        self.check_folder(model_type, unet_config=unet_config, scheduler_config=scheduler_config, what=str(path))
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
            texts = [
                self.text_model_class(part).from_pretrained(path / part, dtype=torch.float32)
                for part in self.text_encoder_parts
            ]
            tokenizers = [CLIPTokenizer.from_pretrained(path / part) for part in self.tokenizer_parts]
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path} could not be loaded as a diffusers pipeline: {exc}", field=FIELD) from None
        return BaseModel(
            unet=unet,
            vae=vae,
            text_encoders=texts,
            tokenizers=tokenizers,
            scheduler_config=scheduler_config,
            model_type=model_type,
            source=str(path),
        )

    def load_single_file(
        self,
        path: Path,
        *,
        model_type: ModelType,
        checkpoint: dict[str, torch.Tensor],
        metadata: dict[str, str],
        tokenizers: list[Any],
    ) -> BaseModel:
        """Models built from the file's embedded configs (this trainer's exports) or the shipped
        ones, filled from the checkpoint by the layout converter."""
        import torch
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL, UNet2DConditionModel

        configs = embedded_configs(metadata, self.text_encoder_parts) or self.shipped_configs(model_type)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            texts = [self.text_model(part, configs[part]) for part in self.text_encoder_parts]
        converted = convert.from_original(
            checkpoint,
            unet_keys=unet.state_dict(),
            unet_config=unet.config,
            vae_keys=vae.state_dict(),
            vae_config=vae.config,
            text_keys=[t.state_dict() for t in texts],
            slots=self.slots_for(model_type),
        )
        if converted.missing:
            sample = ", ".join(converted.missing[:3])
            raise BadInput(
                f"{path.name} does not match the {model_type} architecture: {len(converted.missing)} weights are "
                f"missing (e.g. {sample}); check spec.baseModel.type",
                field=TYPE_FIELD,
            )
        parts: list[tuple[str, Any, dict[str, torch.Tensor]]] = [
            ("UNet", unet, converted.unet),
            ("VAE", vae, converted.vae),
            *((f"text encoder {i + 1}", t, s) for i, (t, s) in enumerate(zip(texts, converted.texts, strict=True))),
        ]
        for name, module, state in parts:
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[1:2] or [str(exc)]
                raise BadInput(
                    f"{path.name}: the {name} does not match the {model_type} architecture ({first[0].strip()}); "
                    "check spec.baseModel.type",
                    field=TYPE_FIELD,
                ) from None
            module.to(torch.float32)
        for text in texts:
            materialize_buffers(text)
        return BaseModel(
            unet=unet,
            vae=vae,
            text_encoders=texts,
            tokenizers=tokenizers,
            scheduler_config=dict(configs["scheduler"]),
            model_type=model_type,
            source=str(path),
            extras=converted.extras,
        )

    def load_original_file(
        self, path: Path, *, model_type: ModelType, components: Path | None, options: LoadOptions
    ) -> BaseModel:
        """A single file holding the denoiser alone (``single_file_is_denoiser``), the rest of the
        pipeline from ``components``."""
        raise NotImplementedError

    def component_patterns(self) -> list[str]:
        """What to fetch of an ``hf://`` repository named by ``spec.baseModel.componentsUri``."""
        return self.hub_patterns()

    def text_model(self, part: str, config: dict[str, Any]) -> Any:
        from transformers import CLIPTextConfig

        return self.text_model_class(part)(CLIPTextConfig(**text_config(config)))

    def shipped_configs(self, model_type: ModelType) -> dict[str, Any]:
        folder = CONFIGS / str(model_type)
        configs: dict[str, Any] = {
            "unet": read_json(folder / "unet" / "config.json"),
            "vae": read_json(folder / "vae" / "config.json"),
            "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
        }
        for part in self.text_encoder_parts:
            configs[part] = read_json(folder / part / "config.json")
        return configs

    # --- the objective -----------------------------------------------------------------------------

    def prediction_type(self, model_type: ModelType) -> str:
        return "epsilon"

    def objective(
        self, base: BaseModel, training: Training, *, prediction_type: str, channels_last: bool, device: Any
    ) -> Objective:
        """The objective a run of this family trains with."""
        return DiffusionObjective(
            self,
            scheduler_config=base.scheduler_config,
            prediction_type=prediction_type,
            scaling_factor=float(base.vae.config.scaling_factor),
            snr_gamma=training.snr_gamma,
            channels_last=channels_last,
            device=device,
        )

    # --- text -----------------------------------------------------------------------------------

    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of each prompt for each tokenizer, padded to its length."""
        return [
            tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in tokenizers
        ]

    def encode(self, text_encoders: list[Any], ids: list[torch.Tensor]) -> Conditioning:
        raise NotImplementedError

    def prompt_window(self, tokenizers: list[Any]) -> tuple[Any, int]:
        """The tokenizer that reads the most of a prompt, and how many tokens it reads (CLIP: 75
        between its start and end tokens)."""
        return tokenizers[0], int(tokenizers[0].model_max_length) - 2

    def prompt_inputs(self, conditioning: Conditioning) -> dict[str, Any]:
        """Pipeline arguments for one prompt's cached embeddings (``text_encoders_leave_gpu``)."""
        raise NotImplementedError

    def sample_options(self, base: BaseModel) -> dict[str, Any]:
        """Pipeline arguments every sample of this family takes."""
        return {}

    def time_ids(
        self, *, original_size: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
    ) -> list[int] | None:
        """SDXL's micro-conditioning of one image; None for families without it."""
        return None

    def denoise(self, unet: Any, noisy: Any, timesteps: Any, conditioning: Conditioning, time_ids: Any) -> Any:
        return unet(noisy, timesteps, conditioning.hidden).sample

    # --- LoRA -----------------------------------------------------------------------------------

    def lora_targets(self, targets: LoRATargets) -> tuple[tuple[str, ...] | str, tuple[str, ...]]:
        """(denoiser targets, text encoder module names) that get adapters: names peft matches
        against the end of a module's path, or one regular expression a whole path must match."""
        from finetune_trainer import lora

        return lora.UNET_TARGETS[targets], lora.TEXT_ENCODER_TARGETS[targets]

    def kohya_unet_name(self, module: str, unet_config: Any) -> str:
        """The kohya-layout name of a UNet module (without ``lora_unet_``)."""
        return module.replace(".", "_")

    def kohya_unet_layers(
        self, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], unet: Any, *, alpha: float
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The denoiser's adapters (module -> (A, B)) as kohya-layout layers: name (without
        ``lora_unet_``) -> (down, up, alpha).  One layer per adapted module here; Flux fuses some."""
        return {self.kohya_unet_name(m, unet.config): (a, b, alpha) for m, (a, b) in adapters.items()}

    def set_attention(self, unet: Any, attention: str) -> None:
        """xformers, sdpa (PyTorch's fused attention) or default (plain attention) in the denoiser."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()
        elif attention == "sdpa":
            unet.set_attn_processor(AttnProcessor2_0())
        else:
            unet.set_attn_processor(AttnProcessor())

    # --- pipelines and exports ---------------------------------------------------------------------

    def pipeline(self, *, base: BaseModel, unet: Any, text_encoders: list[Any], vae: Any | None = None) -> Any:
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class)
        return pipeline_class(**self.pipeline_parts(base=base, unet=unet, text_encoders=text_encoders, vae=vae))

    def pipeline_parts(
        self, *, base: BaseModel, unet: Any, text_encoders: list[Any], vae: Any | None = None
    ) -> dict[str, Any]:
        parts: dict[str, Any] = {
            "vae": vae if vae is not None else base.vae,
            self.denoiser_part: unet,
            **self.pipeline_options,
        }
        parts["scheduler"] = scheduler_for(base)
        for name, encoder in zip(self.text_encoder_parts, text_encoders, strict=True):
            parts[name] = encoder
        for name, tokenizer in zip(self.tokenizer_parts, base.tokenizers, strict=True):
            parts[name] = tokenizer
        return parts

    def architecture(self, model_type: ModelType, *, base: BaseModel | None = None) -> str:
        """The model-spec architecture name web UIs and model browsers read (``base``: where the
        type alone does not tell, as Flux.1 dev from schnell)."""
        raise NotImplementedError

    def kohya_base_version(self, model_type: ModelType) -> str:
        return ""

    def original_state_dict(
        self, *, model_type: ModelType, unet: Any, vae: Any, text_encoders: list[Any], extras: dict[str, Any]
    ) -> Any:
        components = convert.Components(
            unet=unet.state_dict(),
            vae=vae.state_dict(),
            texts=[t.state_dict() for t in text_encoders],
            unet_config=unet.config,
            vae_config=vae.config,
            slots=self.slots_for(model_type),
            extras=extras,
        )
        return convert.to_original(components)

    def extra_exports(self, *, trained: Any, single_file: Path) -> list[Path]:
        """Files that belong beside the single file (SD 2.x: its original config)."""
        return []

    # --- memory ---------------------------------------------------------------------------------

    def memory_needed(self, spec: FineTuneJobSpec, *, mixed_precision: str, optimizer: str) -> MemoryEstimate | None:
        """What a run of ``spec`` needs on one GPU with these settings, or None where the family's
        runs fit the GPUs people train it on."""
        return None


@dataclass(frozen=True)
class LoadOptions:
    """How a family that loads in the run's precision reads its models (Flux): the precision of
    the frozen parts (``mixedPrecision`` in effect: no, fp16 or bf16), the denoiser's
    quantization, and the device it is read onto."""

    precision: str = "no"
    quantization: str = "none"
    device: str = "cpu"
    # A folder for converted copies of what was read (a single-file transformer as a diffusers
    # folder); "" for the system's temporary folder.
    scratch: str = ""

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)


def ema_bytes(spec: FineTuneJobSpec) -> int:
    """Bytes per trained parameter of the moving average on the GPU (spec.training.ema, fp32)."""
    average = spec.training.ema
    return 4 if average is not None and not average.on_cpu else 0


@dataclass(frozen=True)
class MemoryEstimate:
    bytes: float
    basis: str  # where the figure comes from, for the message
    # Of ``bytes``, the step's activations (what is free again between steps).
    activations: float = 0.0


@dataclass
class Prediction:
    """What the model predicted for a micro-batch, what it should have, and each example's loss
    weight (None: every example counts the same, a plain mean squared error)."""

    prediction: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None


class Objective:
    """A family's training objective.  The recipe draws everything else of a slot (its example,
    flip, latent sample, noise) and then asks the objective for the slot's timestep, from the
    same generator, so that resume and data-parallel runs stay exact whatever the family."""

    def draw(self, gen: torch.Generator, bucket: Bucket) -> float:
        """One slot's timestep, drawn from the slot's own generator."""
        raise NotImplementedError

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
        """``latents`` as the VAE gives them (unscaled), ``noise`` of their shape, ``timesteps``
        as ``draw`` gave them."""
        raise NotImplementedError


class DiffusionObjective(Objective):
    """The UNet families' objective, diffusers' ``train_dreambooth.py``: DDPM noise at a uniform
    integer timestep, the epsilon or velocity target, and with ``snrGamma`` min-SNR weights
    (min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction)."""

    def __init__(
        self,
        family: ModelFamily,
        *,
        scheduler_config: dict[str, Any],
        prediction_type: str,
        scaling_factor: float,
        snr_gamma: float | None,
        channels_last: bool,
        device: Any,
    ) -> None:
        import torch
        from diffusers import DDPMScheduler

        self.family = family
        self.scheduler = DDPMScheduler.from_config({**scheduler_config, "prediction_type": prediction_type})
        self.steps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = prediction_type
        self.scaling_factor = scaling_factor
        self.snr_gamma = snr_gamma
        self.channels_last = channels_last
        self.snr: torch.Tensor | None = None
        if snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            # The SNR of every timestep, on the device: a step looks its own up there
            # (compute_snr would copy the schedule to the GPU at every step).
            self.snr = compute_snr(self.scheduler, torch.arange(self.steps)).to(device)

    def draw(self, gen: torch.Generator, bucket: Bucket) -> float:
        import torch

        return int(torch.randint(0, self.steps, (1,), generator=gen))

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

        latents = latents * self.scaling_factor
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        prediction = self.family.denoise(model, noisy, timesteps, conditioning, time_ids)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = None
        if self.snr is not None and self.snr_gamma is not None:
            snr = self.snr[timesteps]
            weights = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            weights = weights / (snr + 1 if self.prediction_type == "v_prediction" else snr)
        return Prediction(prediction, target, weights)


def scheduler_for(base: BaseModel) -> Any:
    import diffusers

    config = {**base.scheduler_config, "prediction_type": base.prediction_type}
    scheduler_class = getattr(diffusers, str(config.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    return scheduler_class.from_config(config)


def check_pipeline_class(path: Path, family: ModelFamily, model_type: ModelType) -> None:
    """Refuse a Flux folder declared as a UNet family (the UNet families tell SD 1.x/2.x and SDXL
    apart by their UNet's config, see ``check_folder``)."""
    index = path / "model_index.json"
    if not index.is_file() or family.pipeline_class == "FluxPipeline":
        return
    if read_json(index).get("_class_name") == "FluxPipeline":
        raise BadInput(
            f"{model_type} does not match the model: {path} is a Flux.1 pipeline folder; set spec.baseModel.type "
            "to flux1",
            field=TYPE_FIELD,
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} is missing or not valid JSON ({exc})", field=FIELD) from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a JSON object", field=FIELD)
    return data


def embedded_configs(metadata: dict[str, str], parts: tuple[str, ...]) -> dict[str, Any] | None:
    """The exact configs this trainer writes into a single file's metadata, if it has them."""
    raw = metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return None
    try:
        configs = json.loads(raw)
    except ValueError:
        return None
    needed = {"unet", "vae", "scheduler", *parts}
    return configs if isinstance(configs, dict) and needed <= configs.keys() else None


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "model_type")}


def materialize_buffers(module: Any) -> None:
    """Buffers that a checkpoint does not carry are still on the meta device: rebuild them."""
    import torch

    for name, buffer in list(module.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "position_ids":
            owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
        else:
            raise BadInput(f"the checkpoint lacks {name}", field=FIELD)


def check_prediction(model_type: ModelType, expected: str, prediction: Any, *, what: str, fix: str) -> None:
    if prediction in ("epsilon", "v_prediction") and prediction != expected:
        raise BadInput(
            f"{model_type} trains with {expected} prediction, but {what} was trained with {prediction}; "
            f"set spec.baseModel.type to {fix}",
            field=TYPE_FIELD,
        )


__all__ = [
    "BaseModel",
    "BaseModelSource",
    "Conditioning",
    "DiffusionObjective",
    "LoadOptions",
    "MemoryEstimate",
    "ModelFamily",
    "Objective",
    "Prediction",
]
