"""finetune.dev/v1alpha1 FineTuneJob.

Field names are a contract (see the design's API section): add fields freely,
rename or remove one only through an issue.  Each field's description ends up
in the CRD, so ``kubectl explain ftj.spec.training`` reads from here.

Rules beyond a field's type and range live in ``rules.py``, each written once
as CEL (``x-kubernetes-validations``, for the apiserver) and as the predicate
the models run (for the trainer, which reads manifests that never went through
an apiserver), with one message; the tests run every bad spec through both.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_api import rules
from finetune_api.rules import (
    QUANTITY_PATTERN,
    URI_HELP,
)

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAME = "ftj"


_Text = TypeVar("_Text", str, str | None)


def _prompt_not_blank(value: str | None) -> str | None:
    return rules.enforce(value, rules.PROMPT)


def check_uri(value: _Text) -> _Text:
    """The models' side of ``rules.URI`` (the cluster-only rule is the CRD's and the operator's)."""
    return rules.enforce(value, rules.URI, show_value=True)


def cluster_uri_problem(value: str | None, *, field: str) -> str | None:
    """The CRD's cluster-only URI rule, for the operator: a spec admitted by an older CRD
    (Helm never upgrades CRDs) is refused when the operator renders it for a cluster."""
    if value is None or rules.CLUSTER_URI.holds(value):
        return None
    return f"{field}: {rules.CLUSTER_URI.message}"


Uri = Annotated[str, Field(min_length=1, max_length=2048)]


class _Model(BaseModel):
    """camelCase on the wire, unknown fields refused (a typo is not silently ignored)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        use_enum_values=True,
        validate_default=True,
        alias_generator=lambda name: re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name),
    )


class Method(StrEnum):
    DREAMBOOTH = "DreamBooth"
    LORA = "LoRA"
    TEXTUAL_INVERSION = "TextualInversion"


class ModelType(StrEnum):
    V1X = "v1x"
    V2X_512 = "v2x-512"
    V2X = "v2x"
    SDXL = "sdxl"
    FLUX1 = "flux1"


# The size each family was trained at; a dataset without a resolution trains at it.
NATIVE_RESOLUTION = {
    ModelType.V1X: 512,
    ModelType.V2X_512: 512,
    ModelType.V2X: 768,
    ModelType.SDXL: 1024,
    ModelType.FLUX1: 1024,
}
# diffusers' train_dreambooth.py and the web UI use 2e-6 for a full UNet; diffusers' LoRA
# scripts use 1e-4 (kohya's too): at 2e-6 an adapter starting from zero barely moves.
# Textual Inversion: diffusers' textual_inversion.py example's 5e-4 (a few vectors, nothing else).
DEFAULT_LEARNING_RATE = {Method.DREAMBOOTH: 2.0e-6, Method.LORA: 1.0e-4, Method.TEXTUAL_INVERSION: 5.0e-4}


class Optimizer(StrEnum):
    ADAMW = "AdamW"
    ADAMW8BIT = "AdamW8bit"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Attention(StrEnum):
    XFORMERS = "xformers"
    SDPA = "sdpa"
    DEFAULT = "default"


class CompileMode(StrEnum):
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"


class LRScheduler(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    COSINE = "cosine"
    LINEAR = "linear"
    POLYNOMIAL = "polynomial"


class LoRATargets(StrEnum):
    KOHYA = "kohya"
    ATTENTION = "attention"


class LoRAType(StrEnum):
    LORA = "lora"
    LOCON = "locon"
    LOHA = "loha"
    LOKR = "lokr"
    DORA = "dora"


class OutputFormat(StrEnum):
    DIFFUSERS = "diffusers"
    SAFETENSORS = "safetensors"


class BaseQuantization(StrEnum):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class TimestepSampling(StrEnum):
    LOGIT_NORMAL = "logit_normal"
    MODE = "mode"
    UNIFORM = "uniform"


class BaseModelSource(_Model):
    """Where the model to fine-tune comes from."""

    uri: Uri = Field(
        description=(
            "The base model: a diffusers folder, or one .safetensors/.ckpt file in the original "
            f"Stable Diffusion layout. {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    type: ModelType = Field(
        default=ModelType.V1X,
        description=(
            "Model family: v1x (SD 1.x, 512 px), v2x-512 (SD 2.x base, 512 px, epsilon), "
            "v2x (SD 2.x, 768 px, v-prediction), sdxl (Stable Diffusion XL, 1024 px), flux1 (Flux.1 dev or "
            "schnell, 1024 px, flow matching, method LoRA only; dev is told from schnell by its guidance "
            "embedding)."
        ),
    )
    revision: str | None = Field(default=None, description="Branch, tag or commit of an hf:// model.")
    vae_uri: Uri | None = Field(
        default=None,
        description=(
            "A replacement VAE (a diffusers AutoencoderKL folder), e.g. an fp16-safe one for sdxl, whose own VAE "
            f"overflows in fp16 and otherwise runs in fp32. {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    components_uri: Uri | None = Field(
        default=None,
        description=(
            "flux1 with uri a single-file transformer in the original (Black Forest Labs) layout, such as "
            "flux1-dev.safetensors: a diffusers Flux.1 folder or hf:// repository whose text encoders, tokenizers, "
            "VAE and scheduler go with it (its transformer weights are not read; its transformer/config.json, "
            f"where present, gives the architecture). {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    credentials_secret: str | None = Field(
        default=None,
        description=(
            "Name of a Secret in the job's namespace whose keys the trainer reads as files, never as "
            "environment variables (HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, "
            "GOOGLE_APPLICATION_CREDENTIALS holding a key file's JSON, ...). A missing Secret fails the job "
            "as bad input."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("vae_uri")
    @classmethod
    def _vae_uri(cls, value: str | None) -> str | None:
        return check_uri(value)

    @field_validator("components_uri")
    @classmethod
    def _components_uri(cls, value: str | None) -> str | None:
        return check_uri(value)


class DatasetLayout(StrEnum):
    AUTO = "auto"
    FOLDER = "folder"
    KOHYA = "kohya"
    IMAGEFOLDER = "imagefolder"


class MaskSource(StrEnum):
    FOLDER = "folder"
    ALPHA = "alpha"


class Masks(_Model):
    """Masked loss: which part of each photo the loss counts (the subject, not its background)."""

    source: MaskSource = Field(
        default=MaskSource.FOLDER,
        description=(
            "folder: a mask image for each photo, the same name (any image extension) in a folder beside the "
            "photos, white where the subject is, black where it is not (grey counts partly); alpha: each photo's "
            "own transparency (opaque is the subject). A photo without a mask trains on the whole picture."
        ),
    )
    folder: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_][-A-Za-z0-9_. ]*$",
        description=(
            "With source folder: the masks' folder inside each folder of photos (unset: masks), e.g. "
            "photos/masks/photo1.png for photos/photo1.jpg. Its images are masks, never training photos."
        ),
    )


class Concept(_Model):
    """One subject of a job with several: its photos, its prompts, its class images."""

    images: Uri = Field(
        description=(
            f"Folder of this concept's photos (a .txt caption beside each, or a metadata.jsonl, optional). {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    instance_prompt: str = Field(
        min_length=1,
        max_length=1000,
        description="Prompt naming this concept with its own unique token.",
        json_schema_extra=rules.cel(rules.PROMPT),
    )
    class_prompt: str | None = Field(
        default=None,
        max_length=1000,
        description="Prompt for this concept's class (prior preservation).",
        json_schema_extra=rules.cel(rules.PROMPT),
    )
    class_images: Uri | None = Field(
        default=None,
        description="Folder of this concept's class images (generated there, or under the output, when missing).",
        json_schema_extra=rules.cel(rules.URI),
    )
    repeats: int = Field(
        default=1, ge=1, le=10000, description="How many times each of its photos counts per epoch (kohya's repeats)."
    )

    @field_validator("images", "class_images")
    @classmethod
    def _uris(cls, value: str | None) -> str | None:
        return check_uri(value)

    _not_blank = field_validator("instance_prompt", "class_prompt")(_prompt_not_blank)


class Dataset(_Model):
    """The photos to learn from and the prompts that describe them."""

    layout: DatasetLayout = Field(
        default=DatasetLayout.AUTO,
        description=(
            "How instanceImages is laid out: folder (photos, an optional same-name .txt caption beside each), "
            "kohya (subfolders '<repeats>_<token> <class>', prompts and repeats from their names; classImages "
            "holds '<repeats>_<class>' folders), imagefolder (photos and a metadata.jsonl with file_name and a "
            "caption column), or auto (detected; what was found is reported on the resource)."
        ),
    )
    instance_images: Uri | None = Field(
        default=None,
        description=(
            "Folder of the subject's photos (.jpg, .jpeg, .png, .webp; captions as the layout says). "
            f"Set this or concepts. {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    instance_prompt: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description=(
            "Prompt naming the subject with a unique token, e.g. 'a photo of nickxxxawesome'. A caption "
            "replaces it for its photo (or fills [filewords] in it). Not needed with layout kohya or concepts."
        ),
        json_schema_extra=rules.cel(rules.PROMPT),
    )
    concepts: list[Concept] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Several subjects in one job, each with its photos, prompts, class images and repeats.",
    )
    caption_column: str = Field(
        default="text", min_length=1, max_length=100, description="The caption column of a metadata.jsonl."
    )
    caption_extension: str = Field(
        default=".txt", pattern=r"^\.[A-Za-z0-9]+$", description="The extension of caption files beside photos."
    )
    require_captions: bool = Field(
        default=False, description="Refuse a photo without a caption (instead of training it on the prompt)."
    )
    trigger_word: str | None = Field(
        default=None,
        max_length=200,
        description=(
            "The subject's token in captions: [trigger] in a caption becomes it, and a caption without it gets "
            "it in front (ai-toolkit's convention)."
        ),
    )
    caption_dropout: float = Field(
        default=0.0, ge=0, le=1, description="Share of steps on which a photo's prompt is left empty."
    )
    shuffle_caption: bool = Field(
        default=False, description="Shuffle a caption's comma-separated tags each time (kohya's shuffle_caption)."
    )
    keep_tokens: int = Field(
        default=0, ge=0, le=100, description="With shuffleCaption: how many leading tags stay in place."
    )
    buckets: bool | None = Field(
        default=None,
        description=(
            "Aspect-ratio buckets: each photo trained at about resolution² pixels in the nearest of a set of "
            "shapes, not cropped square. Unset: on for sdxl and flux1, off for SD 1.x/2.x."
        ),
    )
    bucket_min_side: int | None = Field(
        default=None, ge=64, le=4096, multiple_of=64, description="Shortest bucket side (unset: half the resolution)."
    )
    bucket_max_side: int | None = Field(
        default=None, ge=64, le=4096, multiple_of=64, description="Longest bucket side (unset: twice the resolution)."
    )
    bucket_max_ratio: float = Field(
        default=2.0, ge=1, le=4, description="Largest ratio of a bucket's long side to its short side."
    )
    class_prompt: str | None = Field(
        default=None,
        max_length=1000,
        description="Prompt for the subject's class, e.g. 'a photo of a man' (prior preservation).",
        json_schema_extra=rules.cel(rules.PROMPT),
    )
    class_images: Uri | None = Field(
        default=None,
        description=(
            "Folder of class images. Missing images are generated with the base model and saved "
            "here (or under the output) for reuse."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    prior_preservation: bool = Field(
        default=False,
        description="Train on class images too, so the model keeps what the class looks like.",
    )
    num_class_images: int = Field(
        default=100, ge=1, le=10000, description="How many class images prior preservation uses."
    )
    prior_loss_weight: float = Field(
        default=1.0, gt=0, le=100, description="Weight of the class-image loss against the instance loss."
    )
    resolution: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        multiple_of=8,
        description=(
            "Training resolution in pixels (square); images are resized and cropped to it. "
            "Unset: the model family's native size (v1x and v2x-512: 512, v2x: 768, sdxl and flux1: 1024)."
        ),
    )
    center_crop: bool = Field(
        default=False, description="Crop the centre of each image (true) or a random square (false)."
    )
    random_flip: bool = Field(default=False, description="Flip images horizontally at random.")
    masks: Masks | None = Field(
        default=None,
        description=(
            "Masked loss (kohya's, OneTrainer's): weight each photo's loss by its mask, at the latents' resolution, "
            "so that the model learns the subject and not its background."
        ),
    )
    masked_loss_background: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "With masks: the weight of the background (where a mask is black), from 0 (not learned at all; the "
            "default) to 1 (as much as the subject, as without masks)."
        ),
    )

    @field_validator("instance_images", "class_images")
    @classmethod
    def _uris(cls, value: str | None) -> str | None:
        return check_uri(value)

    _not_blank = field_validator("instance_prompt", "class_prompt")(_prompt_not_blank)

    @model_validator(mode="after")
    def _cross_field(self) -> Dataset:
        return rules.enforce(self, rules.DATASET)


class TextualInversionSettings(_Model):
    """New words learned as vectors of the text encoder's embedding table, everything else
    frozen (method TextualInversion): A1111's embeddings, kohya's and diffusers'
    train_textual_inversion.py."""

    token: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^\S+$",
        description=(
            "The new word, as prompts will write it (e.g. <zqx>): one word that is not in the tokenizer's "
            "vocabulary. The instance prompt must contain it."
        ),
    )
    initializer: str = Field(
        min_length=1,
        max_length=256,
        description=(
            "Words whose embeddings the new vectors start from (e.g. toy, or a short description); with more vectors "
            "than the words' tokens, the tokens are used in turn."
        ),
    )
    vectors: int = Field(
        default=1,
        ge=1,
        le=32,
        description=(
            "Vectors the word stands for (A1111's 'number of vectors per token'): more learn more, and take as many of "
            "the prompt's 75 tokens. Beyond one, the vectors are the words token, token_1, token_2... (diffusers' "
            "convention)."
        ),
    )


class NewTokens(TextualInversionSettings):
    """A new word learned together with a LoRA (pivotal tuning): the word's vectors in the text
    encoder(s), as method TextualInversion learns them, and the adapters in the same steps."""

    train_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description=(
            "The part of the run in which the word's vectors learn; after it they stay as they are and the "
            "adapters go on learning around them (diffusers' advanced script: --train_text_encoder_ti_frac, "
            "0.5 there)."
        ),
    )


class LoRASettings(_Model):
    """Low-rank adapter settings (method LoRA)."""

    rank: int = Field(default=4, ge=1, le=1024, description="Rank of the LoRA matrices.")
    alpha: float = Field(default=4, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA layers.")
    targets: LoRATargets = Field(
        default=LoRATargets.KOHYA,
        description=(
            "Which layers get adapters. kohya (as kohya's scripts and the web UIs): every linear and 1x1 "
            "projection of the UNet's transformer blocks (attention, feed-forward, proj_in/proj_out) and of the "
            "text encoder's layers (attention and MLP). attention (as diffusers' train_dreambooth_lora.py): "
            "the attention projections only; fewer weights, so a given rank learns less."
        ),
    )
    train_text_encoder: bool = Field(default=False, description="Also put LoRA layers on the text encoder.")
    type: LoRAType = Field(
        default=LoRAType.LORA,
        description=(
            "The kind of adapter. lora: a low-rank update B x A x alpha/rank. locon (LyCORIS' LoCon): LoRA on the "
            "UNet's convolutions too (each ResNet block's convolutions and time projection, the down- and "
            "upsamplers). loha (LyCORIS' LoHa): the Hadamard "
            "product of two low-rank updates, more expressive at the same rank. lokr (LyCORIS' LoKr): a Kronecker "
            "product of a small and a larger matrix (see factor), often far fewer weights. dora: LoRA with "
            "the weight's direction and magnitude trained apart (DoRA), closer to a full fine-tune at the same "
            "rank, slower per step (each adapted weight's norm is recomputed). The kohya-layout file of each loads in "
            "the web UIs that read LyCORIS files; flux1 takes lora only."
        ),
    )
    factor: int | None = Field(
        default=None,
        ge=-1,
        description=(
            "lokr: the size of the Kronecker product's small matrix along each side, as LyCORIS' factor; -1 (the "
            "default) splits each side as near its square root as divides it. A larger factor: more weights."
        ),
    )
    decompose_both: bool | None = Field(
        default=None,
        description=(
            "lokr: make the small matrix low-rank too (LyCORIS' decompose_both); default false, the small matrix "
            "is full."
        ),
    )

    new_tokens: NewTokens | None = Field(
        default=None,
        description=(
            "Pivotal tuning (diffusers' advanced DreamBooth LoRA script): a new word learned in the text encoder(s) "
            "together with the adapters, exported beside them as an embedding; for v1x, v2x-512, v2x and sdxl."
        ),
    )

    model_config = ConfigDict(json_schema_extra=rules.cel(rules.LORA))

    @model_validator(mode="after")
    def _check(self) -> LoRASettings:
        return rules.enforce(self, rules.LORA)


class EMASettings(_Model):
    """An exponential moving average of the trained weights (diffusers' EMAModel, as its full
    fine-tune scripts, OneTrainer and SimpleTuner keep one): smoother than the last step's
    weights, and often the better model from a short or noisy run."""

    decay: float = Field(
        default=0.999,
        gt=0,
        lt=1,
        description=(
            "The most each update keeps of the average: after an update, average = decay x average + (1 - decay) x "
            "weights. 0.999 weighs about the last thousand updates; a shorter run wants a smaller decay (0.99)."
        ),
    )
    warmup: bool = Field(
        default=True,
        description=(
            "Ramp the decay up as 1 - (1 + n)^(-3/4) at update n (diffusers' EMA warm-up; the first, n = 0, copies "
            "the weights), so that the base model's weights fade out of the average quickly; false: diffusers' "
            "plain ramp (1 + n) / (10 + n) after the first. Either is capped at decay."
        ),
    )
    every_steps: int = Field(
        default=1, ge=1, le=100000, description="Update the average every N optimizer steps (cheaper, on the CPU)."
    )
    start_step: int = Field(
        default=0,
        ge=0,
        le=10000000,
        description="The optimizer step of the first update (it copies the weights as they are then).",
    )
    on_cpu: bool = Field(
        default=False,
        alias="onCPU",
        description=(
            "Keep the average in the host's memory, not the GPU's (a full UNet's average is 3.4 GB for SD 1.x, "
            "10 GB for SDXL), copied to the GPU for each update as diffusers' --offload_ema does."
        ),
    )
    export: bool = Field(
        default=True,
        description="Export the average (true) or the trained weights as they are (false); checkpoints hold both.",
    )
    samples: bool = Field(
        default=True,
        description=(
            "Render the samples with the average too, into samples/ema/ and samples-ema.png beside the trained "
            "weights' samples."
        ),
    )


class Training(_Model):
    """How long and how to train."""

    steps_per_image: int | None = Field(
        default=None,
        gt=0,
        le=100000,
        description=(
            "How many times each instance image is seen (the web UI's 'Training Steps Per Image (Epochs)'). "
            "Optimizer steps = ceil(stepsPerImage x images / (batchSize x gradientAccumulationSteps x gpus))."
        ),
    )
    max_steps: int | None = Field(
        default=None, gt=0, le=10000000, description="Total training steps; overrides stepsPerImage."
    )
    batch_size: int = Field(default=1, ge=1, le=1024, description="Images per step and GPU.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Steps whose gradients add up before one optimizer update."
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Peak learning rate. Unset: 2e-6 for method DreamBooth (diffusers' and the web UI's default for a "
            "full UNet) and 1e-4 for method LoRA (diffusers' and kohya's LoRA default); the value in effect is "
            "in status.settings."
        ),
    )
    lr_scheduler: LRScheduler = Field(default=LRScheduler.CONSTANT, description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up.")
    optimizer: Optimizer = Field(
        default=Optimizer.ADAMW8BIT,
        description="AdamW, or AdamW8bit (bitsandbytes: optimizer state in 8 bits, about 75% less of it).",
    )
    mixed_precision: MixedPrecision = Field(
        default=MixedPrecision.FP16,
        description="no, fp16 or bf16. Where the device cannot, the trainer falls back and says so in status.",
    )
    attention: Attention = Field(
        default=Attention.SDPA,
        description=(
            "Memory-efficient attention: xformers, sdpa (PyTorch's fused attention) or default. "
            "xformers falls back to sdpa, with a warning on the resource, where it is missing."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in the backward pass: less memory, about 20% slower."
    )
    train_text_encoder: bool = Field(
        default=False, description="Train the text encoder too (DreamBooth; needs about twice the memory)."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(default=1.0e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(default=1.0e-8, gt=0, description="AdamW epsilon.")
    noise_offset: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Offset noise strength (0 = off); helps very dark or bright images.",
    )
    snr_gamma: float | None = Field(
        default=None, gt=0, description="Min-SNR loss weighting gamma (5.0 is common); unset = plain MSE."
    )
    cache_latents: bool = Field(
        default=True,
        description="Encode each image with the VAE once instead of every step (exact; uses a little memory).",
    )
    compile: bool | None = Field(
        default=None,
        description="torch.compile the UNet. Unset: on for CUDA runs long enough to repay the compile time.",
    )
    compile_mode: CompileMode = Field(
        default=CompileMode.DEFAULT,
        description=(
            "How a compiled UNet runs: default, or reduce-overhead (CUDA graphs: less launch overhead at "
            "batch 1 for more GPU memory; gradientAccumulationSteps 1 only)."
        ),
    )
    prefer_bf16: bool = Field(
        default=True,
        description=(
            "With mixedPrecision fp16, train in bf16 on GPUs that support it: the same memory, no loss "
            "scaling, a wider range and coarser rounding than fp16. false keeps fp16."
        ),
    )
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="Random seed; runs with one seed repeat.")
    base_quantization: BaseQuantization = Field(
        default=BaseQuantization.NONE,
        description=(
            "flux1: the frozen transformer in 8 bits (int8) or 4 bits (nf4, QLoRA) through bitsandbytes, the "
            "LoRA in full precision: about 24 GB of weights become 12 GB (int8) or 6.7 GB (nf4). Needs a CUDA "
            "GPU; elsewhere the trainer trains unquantized and says so in status.warnings. none for other types."
        ),
    )
    timestep_sampling: TimestepSampling | None = Field(
        default=None,
        description=(
            "flux1 (flow matching): how each image's timestep is drawn, as diffusers' train_dreambooth_lora_flux.py "
            "offers: logit_normal (mean 0, std 1: most draws mid-schedule; SD3's best setting), mode (mode scale "
            "1.29) or uniform; then shifted as the model's scheduler shifts it (dev by the image's size, as at "
            "inference). Unset: logit_normal. Only for flux1."
        ),
    )
    lora: LoRASettings | None = Field(default=None, description="LoRA settings; only with method LoRA.")
    ema: EMASettings | None = Field(
        default=None,
        description=(
            "Keep an exponential moving average of the trained weights (the UNet's, the text encoder's where it "
            "trains, or a LoRA's adapters), checkpointed and resumed with them; exported and sampled as it says."
        ),
    )

    @model_validator(mode="after")
    def _steps(self) -> Training:
        return rules.enforce(self, rules.TRAINING)


class Checkpoints(_Model):
    """Intermediate checkpoints (full training state; a retried pod resumes from the newest)."""

    every_steps: int = Field(default=0, ge=0, description="Save every N steps; 0 saves only the final model.")
    keep_last: int = Field(default=1, ge=1, le=1000, description="How many checkpoints to keep.")


class Output(_Model):
    """Where the trained model goes and in which forms."""

    uri: Uri = Field(
        description=f"Folder for checkpoints, exports and samples. {URI_HELP}.",
        json_schema_extra=rules.cel(rules.URI),
    )
    half_precision: bool = Field(
        default=True,
        description="Save the exported weights in fp16 (the web UI's 'Half Model'): half the size.",
    )
    formats: list[OutputFormat] = Field(
        default_factory=lambda: [OutputFormat.DIFFUSERS, OutputFormat.SAFETENSORS],
        min_length=1,
        description=(
            "diffusers (a folder for from_pretrained) and/or safetensors (one file in the original "
            "SD key layout that the web UIs load)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set", "default": ["diffusers", "safetensors"]},
    )
    merge_lora: bool = Field(
        default=False,
        alias="mergeLoRA",
        description="Method LoRA: also export a full model with the adapter merged in.",
    )
    select: Literal["last", "best"] = Field(
        default="last",
        description=(
            "Which checkpoint the exports are made from: last (the end of the run) or best (the one "
            "spec.evaluation ranks first; kept whatever checkpoints.keepLast says)."
        ),
    )
    overwrite: bool = Field(
        default=False,
        description=(
            "An output folder belongs to one FineTuneJob and one dataset: a job finding another job's (or another "
            "dataset's) run there is refused. true moves what is there aside (into .replaced-<time>/ inside the "
            "output) and starts afresh; nothing is deleted."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value)


class Score(StrEnum):
    """The DreamBooth paper's scores (Ruiz et al., CVPR 2023, DreamBench): subject fidelity as DINO
    and CLIP-I (each generated image against the instance photos), prompt fidelity as CLIP-T."""

    DINO = "dino"
    CLIP_I = "clipI"
    CLIP_T = "clipT"
    HOLD_OUT_LOSS = "holdOutLoss"


class Evaluation(_Model):
    """Scores on every checkpoint: the evaluation prompts rendered with the samples' settings at
    fixed seeds, scored as the DreamBooth paper does."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Prompts rendered at every checkpoint and scored with the models below (e.g. DreamBench's: a photo of sks "
            "dog in the jungle)."
        ),
    )
    images_per_prompt: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Images per prompt, at seeds spec.samples.seed, +1, +2... (DreamBench renders 4).",
    )
    clip_model: Uri | None = Field(
        default=None,
        description=(
            "A CLIP model (transformers' CLIPModel with its processor) for CLIP-I and CLIP-T, e.g. "
            f"hf://openai/clip-vit-base-patch32. {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    dino_model: Uri | None = Field(
        default=None,
        description=(
            "A DINO ViT (its CLS embedding) for the DINO score; the paper's is ViT-S/16, "
            f"hf://facebook/dino-vits16. {URI_HELP}."
        ),
        json_schema_extra=rules.cel(rules.URI),
    )
    hold_out: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "Photos kept out of training (the last ones, by concept and name; each concept keeps at least one) "
            "whose denoising loss is measured at every checkpoint at fixed noise and timesteps: holdOutLoss, lower "
            "is better, with no scoring model."
        ),
    )
    rank_by: Score = Field(
        default=Score.DINO,
        description=(
            "The score that ranks checkpoints (higher is better; holdOutLoss: lower), for output.select: best and "
            "the status."
        ),
    )
    floors: dict[str, float] = Field(
        default_factory=dict,
        max_length=3,
        description=(
            "The least each other score must reach for a checkpoint to rank (e.g. clipT: 0.25, so that the subject "
            "does not win by ignoring the prompt); where none reaches them, all rank."
        ),
    )

    model_config = ConfigDict(json_schema_extra=rules.cel(rules.EVALUATION))

    @field_validator("clip_model", "dino_model")
    @classmethod
    def _uris(cls, value: str | None) -> str | None:
        return check_uri(value)

    @model_validator(mode="after")
    def _check(self) -> Evaluation:
        return rules.enforce(self, rules.EVALUATION)

    def needs(self) -> set[str]:
        """The scores the rule reads."""
        return {str(self.rank_by), *self.floors}


class Samples(_Model):
    """Preview images rendered during training."""

    prompts: list[Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=list, max_length=16, description="Prompts to render (up to 16)."
    )
    every_steps: int = Field(default=0, ge=0, description="Render every N steps (0: only at the end).")
    num_inference_steps: int = Field(default=25, ge=1, le=500, description="Denoising steps per sample.")
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        le=50,
        description=(
            "Guidance scale. Unset: 7.5 (classifier-free guidance) for SD and SDXL, 3.5 for flux1 (dev's distilled "
            "guidance; schnell takes none)."
        ),
    )
    negative_prompt: str = Field(default="", max_length=1000, description="Negative prompt for all samples.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the sample noise (fixed across steps).")


class Storage(_Model):
    """How the trainer reaches object storage (every s3:// and gs:// URI of the job)."""

    s3_endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        description=(
            "Endpoint of an S3-compatible store (MinIO, Ceph, R2, ...) for every s3:// URI of the job, "
            "e.g. http://minio.storage.svc:9000. Unset: AWS S3, or AWS_ENDPOINT_URL from the Secret "
            "named by spec.baseModel.credentialsSecret. Credentials come from that Secret "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION)."
        ),
        json_schema_extra=rules.cel(rules.S3_ENDPOINT),
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return rules.enforce(value, rules.S3_ENDPOINT, show_value=True)


DEFAULT_SHM_SIZE = "8Gi"


class Resources(_Model):
    """What the training pod asks of the cluster."""

    gpus: int = Field(default=1, ge=1, le=64, description="GPUs for the training pod (one process per GPU).")
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        min_length=1,
        max_length=253,
        description="Extended resource name of a GPU on your nodes.",
        json_schema_extra=rules.cel(rules.GPU_RESOURCE),
    )
    cpu: str = Field(
        default="4",
        pattern=QUANTITY_PATTERN,
        max_length=64,
        description="CPU request of the training pod (a quantity).",
        json_schema_extra=rules.cel(rules.POSITIVE_QUANTITY),
    )
    memory: str = Field(
        default="32Gi",
        pattern=QUANTITY_PATTERN,
        max_length=64,
        description="Memory request and limit of the training pod.",
        json_schema_extra=rules.cel(rules.POSITIVE_QUANTITY),
    )
    shm_size: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        max_length=64,
        description=(
            f"Size of /dev/shm for the data loaders: memory, counted against the pod's memory limit, so at most "
            f"memory. Unset: {DEFAULT_SHM_SIZE}, or memory where that is less."
        ),
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Tolerations of the pod (added to the operator's defaults).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Affinity of the pod, as in a PodSpec.",
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str = Field(default="", max_length=253, description="PriorityClass of the pod.")
    placement_profile: str = Field(
        default="",
        max_length=63,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        description=(
            "A placement profile of this cluster (the chart's jobPolicy.placementProfiles): the node selector, "
            "tolerations, affinity and priority class its platform team set for a kind of node. Where the cluster "
            "allows free placement, this job's own are added; the profile's win where both set one."
        ),
    )

    @field_validator("gpu_resource")
    @classmethod
    def _gpu_resource(cls, value: str) -> str:
        return rules.enforce(value, rules.GPU_RESOURCE, show_value=True)

    @field_validator("cpu", "memory")
    @classmethod
    def _positive(cls, value: str) -> str:
        return rules.enforce(value, rules.POSITIVE_QUANTITY, show_value=True)

    @model_validator(mode="after")
    def _shm(self) -> Resources:
        return rules.enforce(self, rules.RESOURCES)

    @property
    def shm(self) -> str:
        """/dev/shm's size in effect: shmSize, else DEFAULT_SHM_SIZE or the memory where that is less."""
        if self.shm_size is not None:
            return self.shm_size
        smaller = rules.quantity_value(DEFAULT_SHM_SIZE) <= rules.quantity_value(self.memory)
        return DEFAULT_SHM_SIZE if smaller else self.memory


class RunPolicy(_Model):
    """Retries, deadlines and queueing of the underlying batch/v1 Job."""

    backoff_limit: int = Field(default=3, ge=0, le=100, description="Retries after a transient failure.")
    active_deadline_seconds: int | None = Field(
        default=None, gt=0, description="Fail the job after this many seconds of running."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Delete the Job (not the FineTuneJob, whose status stays) this long after it ends; "
            "set on the Job only once the operator has recorded the result."
        ),
    )
    suspend: bool = Field(default=False, description="Stop the pods now (true) and continue later (false).")
    queue_name: str = Field(
        default="",
        max_length=63,
        description="Kueue LocalQueue name (a label value); the Job waits to be admitted.",
        json_schema_extra=rules.cel(rules.QUEUE_NAME),
    )
    priority_class: str = Field(
        default="",
        max_length=63,
        description=(
            "Kueue WorkloadPriorityClass name (with queueName): a higher value is admitted first "
            "and may preempt lower ones; a preempted job resumes from its newest checkpoint."
        ),
        json_schema_extra=rules.cel(rules.PRIORITY_CLASS),
    )

    @field_validator("priority_class")
    @classmethod
    def _priority_class_is_a_name(cls, value: str) -> str:
        return rules.enforce(value, rules.PRIORITY_CLASS, show_value=True)

    @field_validator("queue_name")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        return rules.enforce(value, rules.QUEUE_NAME, show_value=True)


# Fields that never change once the FineTuneJob exists.
IMMUTABLE = ("method", "baseModel", "dataset", "runPolicy.priorityClass")
IMMUTABLE_TEXT = "is immutable once the job exists: create a new FineTuneJob to change it"

# What the Job is made from: fixed once the Job exists (status.jobName), so that the running
# Job and the status (which maps the trainer's paths with the spec) never disagree.  Until then
# (a Job the apiserver refused) they stay editable, so that the fix can be applied.  The rest
# of runPolicy (suspend, ttlSecondsAfterFinished) follows the spec while the job runs.
# Both lists are enforced by a ValidatingAdmissionPolicy on the FineTuneJob itself, not by CEL
# rules in the CRD: those would run on every status write too (see finetune_api.policy).
STARTED_IMMUTABLE = (
    "training",
    "checkpoints",
    "output",
    "samples",
    "resources",
    "storage",
    "image",
    "runPolicy.backoffLimit",
    "runPolicy.activeDeadlineSeconds",
    "runPolicy.queueName",
)
STARTED_IMMUTABLE_TEXT = (
    "cannot change once the job's Job exists (status.jobName): create a new FineTuneJob to change it"
)


class FineTuneJobSpec(_Model):
    """What to train, on what, and where the result goes."""

    method: Method = Field(
        default=Method.DREAMBOOTH,
        description=(
            "DreamBooth (full UNet, optional text encoder), LoRA (small adapter files) or TextualInversion (a new "
            "word's vectors in the text encoder; spec.textualInversion)."
        ),
    )
    textual_inversion: TextualInversionSettings | None = Field(
        default=None, description="The word a TextualInversion run learns (method TextualInversion)."
    )
    base_model: BaseModelSource = Field(
        description="The model to fine-tune.",
    )
    dataset: Dataset = Field(
        description="Instance (and class) images and prompts.",
        json_schema_extra=rules.cel(rules.DATASET),
    )
    training: Training = Field(
        description="Steps, optimizer, precision and memory settings.",
        json_schema_extra=rules.cel(rules.TRAINING),
    )
    checkpoints: Checkpoints = Field(
        default_factory=Checkpoints, description="Intermediate checkpoints.", json_schema_extra={"default": {}}
    )
    output: Output = Field(description="Where the trained model is written.")
    samples: Samples = Field(
        default_factory=Samples, description="Preview images during training.", json_schema_extra={"default": {}}
    )
    evaluation: Evaluation | None = Field(
        default=None,
        description=(
            "Scores on every checkpoint (DINO, CLIP-I, CLIP-T as the DreamBooth paper); off unless set. Needs the "
            "scoring models' URIs."
        ),
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="GPUs, CPU, memory and placement.",
        json_schema_extra={"default": {}, **rules.cel(rules.RESOURCES)},
    )
    storage: Storage = Field(
        default_factory=Storage,
        description="Object-storage settings (an S3-compatible endpoint).",
        json_schema_extra={"default": {}},
    )
    image: str = Field(default="", max_length=1024, description="Trainer image; empty: the operator's default.")
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy, description="Retries, deadlines, suspend, queue.", json_schema_extra={"default": {}}
    )

    model_config = ConfigDict(json_schema_extra=rules.cel(rules.SPEC))

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        return rules.enforce(self, rules.SPEC)

    @property
    def lora(self) -> LoRASettings:
        """The LoRA settings in effect (defaults when method LoRA leaves them out)."""
        return self.training.lora or LoRASettings()

    @property
    def resolution(self) -> int:
        """The training resolution in effect: the dataset's, else the family's native size."""
        return self.dataset.resolution or NATIVE_RESOLUTION[ModelType(self.base_model.type)]

    @property
    def learning_rate(self) -> float:
        """The peak learning rate in effect: the spec's, else the method's default."""
        if self.training.learning_rate is not None:
            return self.training.learning_rate
        return DEFAULT_LEARNING_RATE[Method(self.method)]


# --- status ---------------------------------------------------------------------------------------


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    INITIALIZING = "Initializing"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    # Kueue took the job's quota for a job of higher priority; it continues from its newest
    # checkpoint once admitted again.
    PREEMPTED = "Preempted"

    @property
    def final(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Reason(StrEnum):
    """Why a FineTuneJob is where it is (status.reason, a condition's reason, an Event's), short
    of a failure: those are ``FailureReason``.  Kueue's and Kubernetes' own reasons, where the
    status passes them on (a Workload's eviction or quota reason, a Job's failure reason that
    nothing of ours explains), are theirs and keep their words."""

    CREATING = "Creating"
    STARTING = "Starting"
    SCHEDULING = "Scheduling"
    UNSCHEDULABLE = "Unschedulable"
    POD_STARTING = "PodStarting"
    TRAINER_STARTING = "TrainerStarting"
    RETRYING = "Retrying"
    # The trainer's stages before the first step (Stage, in CamelCase).
    DOWNLOADING = "Downloading"
    CLASS_IMAGES = "ClassImages"
    CACHING = "Caching"
    COMPILING = "Compiling"
    # The trainer reported that it failed; its pod has not ended yet.
    TRAINER_FAILED = "Failed"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    COMPLETED = "Completed"
    STOPPED_EARLY = "StoppedEarly"  # stopped on request (finetune.dev/stop-now); what there was is exported
    SUSPENDED = "Suspended"
    JOB_SUSPENDED = "JobSuspended"
    # Creating the Job.
    WAITING_FOR_OLD_JOB = "WaitingForOldJob"
    NAME_CONFLICT = "NameConflict"
    JOB_REJECTED = "JobRejected"
    # The Job could not be made for a reason that passes (a webhook down, the apiserver busy).
    JOB_CREATE_FAILING = "JobCreateFailing"
    # Kueue.
    WAITING_FOR_ADMISSION = "WaitingForAdmission"
    PENDING = "Pending"
    QUOTA_RESERVED = "QuotaReserved"
    ADMITTED = "Admitted"
    PREEMPTED = "Preempted"
    EVICTED = "Evicted"
    # The conditions' own: the Created condition's, and each condition's while it is False.
    JOB_CREATED = "JobCreated"
    NOT_QUEUED = "NotQueued"
    NOT_RUNNING = "NotRunning"
    NOT_SUSPENDED = "NotSuspended"
    NOT_SUCCEEDED = "NotSucceeded"
    NOT_FAILED = "NotFailed"


class FailureReason(StrEnum):
    """Why a training pod or Job failed, or why its pod cannot start: the trainer's own (its
    summary's reason, by exit code) and what the operator reads from the pod and the Job."""

    BAD_INPUT = "BadInput"
    OUT_OF_MEMORY = "OutOfMemory"
    ERROR = "TrainerError"
    OOM_KILLED = "OOMKilled"
    # The cluster stopped the pod: retried.
    PREEMPTED = "Preempted"
    NODE_LOST = "NodeLost"
    EVICTED = "Evicted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT = "BackoffLimit"
    JOB_FAILED = "JobFailed"
    JOB_DELETED = "JobDeleted"
    INVALID_SPEC = "InvalidSpec"
    # The pod cannot start (it stays Pending).
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"


class Stage(StrEnum):
    """What the trainer is doing, finer than the phase."""

    STARTING = "starting"
    DOWNLOADING = "downloading"
    CLASS_IMAGES = "class-images"
    CACHING = "caching"
    COMPILING = "compiling"
    TRAINING = "training"
    CHECKPOINTING = "checkpointing"
    SAMPLING = "sampling"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"


class Condition(_Model):
    type: str = Field(description="Created, Queued, Running, Suspended, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="What happened, for a person.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time of the last change.")


class Progress(_Model):
    stage: Stage | None = Field(default=None, description="What the trainer is doing now.")
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps in the whole run.")
    percent: float | None = Field(default=None, ge=0, le=100, description="step / totalSteps in percent.")
    loss: float | None = Field(default=None, description="Smoothed training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    steps_per_second: float | None = Field(default=None, ge=0, description="Recent training speed.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds until training ends.")
    peak_memory_bytes: int | None = Field(default=None, ge=0, description="Peak GPU memory allocated.")
    gpu_utilization: float | None = Field(
        default=None, ge=0, le=100, description="How busy the GPU was at the report, percent (NVML)."
    )
    update_time: str | None = Field(default=None, description="When the trainer reported this.")


class CheckpointRef(_Model):
    step: int = Field(ge=0, description="Step the checkpoint holds.")
    uri: str = Field(max_length=2048, description="Where it is (pvc://claim/path or an object-store URI).")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size.")
    time: str | None = Field(default=None, description="When it was completed.")
    scores: dict[str, float] = Field(
        default_factory=dict, max_length=8, description="Its scores (spec.evaluation): dino, clipI, clipT."
    )


class PodUsage(_Model):
    """One training pod's running time, as its container's start and end (or the newest report
    while it runs) say."""

    name: str = Field(description="The pod.")
    seconds: float = Field(ge=0, description="How long its trainer ran.")


class UsageStatus(_Model):
    """What the job has used: GPU time over every attempt (time queued or pending apart) and,
    where the operator is given prices, what it cost."""

    gpus: int = Field(ge=0, description="GPUs per attempt (spec.resources.gpus).")
    gpu_seconds: float = Field(ge=0, description="GPUs x running time, summed over attempts.")
    gpu_product: str | None = Field(
        default=None, description="The GPU model of the node the newest attempt ran on (its product label)."
    )
    cost: float | None = Field(
        default=None, ge=0, description="gpuSeconds at the price per GPU-hour the operator has for gpuProduct."
    )
    currency: str | None = Field(default=None, description="The currency of cost.")
    pods: list[PodUsage] = Field(
        default_factory=list, max_length=64, description="Each attempt's running time, oldest first."
    )


class EstimateStatus(_Model):
    """How long and how much, before the job runs: from the measured speed of finished jobs of
    the same kind (family, method, resolution, batch, GPUs). An estimate, never a promise."""

    duration_seconds: int = Field(ge=0, description="Expected running time of the pod(s), in seconds.")
    duration_text: str = Field(description="The same for display, e.g. 1h20m.")
    gpu_product: str | None = Field(default=None, description="The GPU the jobs it rests on ran on.")
    cost: float | None = Field(default=None, ge=0, description="At the operator's price per GPU-hour for gpuProduct.")
    currency: str | None = Field(default=None, description="The currency of cost.")
    based_on: int = Field(ge=1, description="How many finished jobs of this kind it rests on.")


class EvaluationStatus(_Model):
    """The checkpoint spec.evaluation ranks first, and by which rule."""

    rule: str = Field(description="How checkpoints are ranked, in words.")
    best_step: int | None = Field(default=None, ge=0, description="The step of the best checkpoint so far.")
    best_scores: dict[str, float] = Field(default_factory=dict, max_length=8, description="Its scores.")
    seconds: float | None = Field(default=None, ge=0, description="How long the last evaluation took.")


class OutputFile(_Model):
    path: str = Field(min_length=1, max_length=1024, description="Path relative to the output URI.")
    size_bytes: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the content (hex).")


class OutputStatus(_Model):
    uri: str | None = Field(default=None, description="The output folder.")
    files: list[OutputFile] = Field(default_factory=list, description="Exported files.")
    samples: list[str] = Field(default_factory=list, description="Preview image URIs, newest last.")


class ConceptFound(_Model):
    name: str = Field(description="The concept: its folder, or the prompt it trains.")
    images: int = Field(ge=0, description="Photos used.")
    repeats: int = Field(default=1, ge=1, description="Times each counts per epoch.")
    captioned: int = Field(default=0, ge=0, description="Photos with a caption of their own.")
    class_images: int = Field(default=0, ge=0, description="Class images (prior preservation).")
    prompt: str = Field(default="", description="Its instance prompt (where photos have no caption).")


class BucketFound(_Model):
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    images: int = Field(ge=0, description="Photos in this bucket.")


class DatasetStatus(_Model):
    """What the trainer found in the dataset, checked before the first step."""

    layout: str = Field(description="folder, kohya, imagefolder or concepts.")
    images: int = Field(ge=0, description="Photos in all.")
    concepts: list[ConceptFound] = Field(default_factory=list, max_length=64)
    buckets: list[BucketFound] = Field(
        default_factory=list, max_length=128, description="Aspect-ratio buckets in use, with their photos."
    )
    caption_coverage: float = Field(default=0, ge=0, le=100, description="Percent of photos with a caption.")
    masked: int | None = Field(default=None, ge=0, description="Photos with a mask (spec.dataset.masks).")


class QueueStatus(_Model):
    """Where Kueue has the job (spec.runPolicy.queueName)."""

    name: str = Field(description="The LocalQueue (spec.runPolicy.queueName).")
    workload: str | None = Field(default=None, description="Kueue's Workload of the Job.")
    cluster_queue: str | None = Field(default=None, description="The ClusterQueue that admitted it.")
    position: int | None = Field(
        default=None, ge=1, description="While it waits: its place in the LocalQueue (1 = next), as Kueue says."
    )
    position_in_cluster_queue: int | None = Field(
        default=None, ge=1, description="While it waits: its place among all of the ClusterQueue's pending jobs."
    )


class FineTuneJobStatus(_Model):
    phase: Phase | None = Field(default=None, description="Where the job is in its life.")
    reason: str | None = Field(default=None, description="Why it is in this phase (CamelCase).")
    message: str | None = Field(default=None, description="One line a person can act on.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, description="The spec generation acted on.")
    job_name: str | None = Field(default=None, description="Name of the batch/v1 Job.")
    attempts: int | None = Field(default=None, ge=0, description="Pods started so far (retries + 1).")
    start_time: str | None = Field(default=None, description="When the first pod started.")
    completion_time: str | None = Field(default=None, description="When the job ended.")
    progress: Progress | None = Field(default=None, description="Live training progress.")
    # Display-only twins of progress, so that `kubectl get ftj` shows
    # "120/1500 (8%)" and "3m20s" rather than raw numbers.
    progress_text: str | None = Field(default=None, description="Progress for display: step/total (percent).")
    eta_text: str | None = Field(default=None, description="Time left for display, e.g. 3m20s.")
    checkpoints: list[CheckpointRef] = Field(default_factory=list, description="Checkpoints on storage.")
    output: OutputStatus | None = Field(default=None, description="The trained model's files.")
    queue: QueueStatus | None = Field(default=None, description="Kueue's view of the job, with queueName.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Settings the trainer could not honour and what it did instead.",
    )
    dataset: DatasetStatus | None = Field(default=None, description="What the trainer found in the dataset.")
    evaluation: EvaluationStatus | None = Field(
        default=None, description="The best checkpoint by spec.evaluation's scores, and the rule."
    )
    usage: UsageStatus | None = Field(default=None, description="GPU time used over every attempt, and its cost.")
    estimate: EstimateStatus | None = Field(
        default=None,
        description="Before it ran: the time and cost expected from finished jobs of the same kind (with maxSteps).",
    )


class ObjectMeta(BaseModel):
    """The parts of metadata the API cares about; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None


class FineTuneJob(_Model):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(default="finetune.dev/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


# --- reading manifests ------------------------------------------------------------------------------


class ManifestError(ValueError):
    """A manifest that does not validate; ``str()`` lists each problem with its field path."""

    def __init__(self, problems: list[str], *, source: str = "") -> None:
        self.problems = problems
        if len(problems) == 1:
            text = f"{source}: {problems[0]}" if source else problems[0]
        else:
            # One problem a line, each with its field path once.
            head = f"{source}: {len(problems)} problems" if source else f"{len(problems)} problems"
            text = head + ":\n" + "\n".join(f"- {p}" for p in problems)
        super().__init__(text)


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after[_uri(), str]",) or "[" in str(item):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def describe_errors(exc: ValidationError) -> list[str]:
    """One sentence per problem, each starting with the field path (``spec.training.batchSize``)
    once; an unknown field names the nearest known one."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = _field_path(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            near = nearest_field(loc)
            hint = f"did you mean {near}? " if near else "check the spelling; "
            explain = ".".join(["ftj", *(str(x) for x in loc[:-1] if isinstance(x, str) and "[" not in x)])
            message = f"unknown field ({hint}fields are camelCase, see `kubectl explain {explain}`)"
        elif error["type"] == "missing":
            message = "required field is missing"
        if path and _names_a_field(message, under=path):
            problems.append(message)  # a model's own check names its field already
        else:
            problems.append(f"{path}: {message}" if path else message)
    return problems


def _names_a_field(message: str, *, under: str) -> bool:
    """Whether ``message`` starts with a field path at or below ``under`` (``spec.method: ...``,
    ``spec.training.lora is only for ...``)."""
    head = re.split(r"[\s:]", message, maxsplit=1)[0]
    return head == under or head.startswith((under + ".", under + "["))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, through Optional, list, dict and Annotated."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def nearest_field(loc: tuple[Any, ...]) -> str | None:
    """The known field nearest to the unknown last part of ``loc`` (``batchsize`` -> ``batchSize``),
    among the fields of the model at that place; None where nothing is near."""
    import difflib

    model: Any = FineTuneJob
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = next(
            (f for name, f in model.model_fields.items() if part in (name, f.alias)),
            None,
        )
        if field is None:
            return None
        model = _model_in(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    known = [f.alias or name for name, f in model.model_fields.items()]
    wrong = str(loc[-1])
    by_lower = {k.lower().replace("_", ""): k for k in known}
    if wrong.lower().replace("_", "").replace("-", "") in by_lower:
        return by_lower[wrong.lower().replace("_", "").replace("-", "")]
    close = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6)
    return close[0] if close else None


def parse_manifest(data: Any, *, source: str = "") -> FineTuneJob:
    """Validate a FineTuneJob already parsed from YAML/JSON."""
    if not isinstance(data, dict):
        raise ManifestError(["the manifest must be a FineTuneJob object"], source=source)
    kind = data.get("kind")
    if kind is not None and kind != KIND:
        raise ManifestError([f"kind: expected {KIND}, got {kind!r}"], source=source)
    api_version = data.get("apiVersion")
    if api_version is not None and api_version != API_VERSION:
        raise ManifestError([f"apiVersion: expected {API_VERSION}, got {api_version!r}"], source=source)
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(describe_errors(exc), source=source) from None


def load_manifest(path: str | Path) -> FineTuneJob:
    """Read a FineTuneJob from a YAML file (the first FineTuneJob document in it)."""
    text = Path(path).read_text()
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError([f"not valid YAML: {exc}"], source=str(path)) from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if not jobs:
        raise ManifestError([f"no {KIND} document in the file"], source=str(path))
    return parse_manifest(jobs[0], source=str(path))


def dump_spec(job: FineTuneJob) -> dict[str, Any]:
    """The wire form (camelCase), leaving out unset optional fields."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)
