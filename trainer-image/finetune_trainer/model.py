"""The base model: from a diffusers folder, or one original-layout checkpoint file, found
locally, on the Hugging Face hub (``hf://``) or in object storage (``s3://``, ``gs://``,
``https://``).

A single file is read with this package's own configs (``configs/<type>/``) so that it
loads offline; one written by this trainer carries its exact configs in its metadata, so a
fine-tuned model can be the base of the next run whatever its size.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import BaseModelSource, ModelType
from finetune_trainer import convert, original_config, storage
from finetune_trainer.errors import BadInput
from finetune_trainer.job import PREDICTION_TYPES

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune_trainer")

FIELD = "spec.baseModel.uri"
TYPE_FIELD = "spec.baseModel.type"
CONFIGS = Path(__file__).parent / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
CONFIG_METADATA_KEY = "finetune.configs"
# Where a single file's tokenizer comes from when none lies beside it (the same BPE
# vocabulary; SD 2.x pads differently).  A trainer image bakes these into its hub cache.
HUB_TOKENIZERS = {
    "clip": ("openai/clip-vit-large-patch14", ""),
    "open_clip": ("stabilityai/stable-diffusion-2", "tokenizer"),
}
_V1_WIDTH, _V2_WIDTH = 768, 1024


@dataclass
class BaseModel:
    """The pieces of a Stable Diffusion pipeline, in fp32, as training starts from them."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    model_type: ModelType
    text_layout: convert.TextLayout
    source: str  # where it was read from, for the log and the manifest
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return PREDICTION_TYPES[self.model_type]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def text_layout_for(model_type: ModelType) -> convert.TextLayout:
    return "clip" if model_type == ModelType.V1X else "open_clip"


def load_base_model(source: BaseModelSource, *, cache_dir: Path, store: storage.ObjectStore | None = None) -> BaseModel:
    model_type = ModelType(source.type)
    path = locate(source, cache_dir=cache_dir, store=store)
    if path.is_dir() and not (path / "model_index.json").is_file():
        checkpoints = sorted(p for p in path.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)
        if len(checkpoints) != 1:
            raise BadInput(
                f"{path} is neither a diffusers folder (no model_index.json) nor a folder with exactly one "
                f".safetensors/.ckpt checkpoint (found {len(checkpoints)}); point it at one of those",
                field=FIELD,
            )
        path = checkpoints[0]
    if path.is_dir():
        return load_diffusers_folder(path, model_type=model_type)
    return load_single_file(path, model_type=model_type)


def locate(source: BaseModelSource, *, cache_dir: Path, store: storage.ObjectStore | None = None) -> Path:
    """A local path for the base model, downloading it first where it is remote."""
    uri = source.uri
    if storage.scheme(uri) == "hf":
        return _from_hub(uri, revision=source.revision, cache_dir=cache_dir)
    path = storage.fetch(uri, field=FIELD, cache_dir=cache_dir, store=store)
    assert path is not None  # missing_ok is off: a missing model is bad input
    if not path.exists():
        raise BadInput(
            f"{path} does not exist; give the path of a diffusers folder or a .safetensors file", field=FIELD
        )
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise BadInput(f"{path} is not a .safetensors or .ckpt checkpoint nor a diffusers folder", field=FIELD)
    return path


def _from_hub(uri: str, *, revision: str | None, cache_dir: Path) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    parts = uri.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 2:
        raise BadInput(f"{uri}: an hf:// URI is hf://OWNER/REPO or hf://OWNER/REPO/FILE.safetensors", field=FIELD)
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    offline = hub_offline()
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=offline))
        ignore = ["*.msgpack", "*.onnx", "*.h5", "*.ckpt", "*fp16*", "*non_ema*", "*.pb"]
        if not offline:
            files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
            if any(f.startswith("unet/") and f.endswith(".safetensors") for f in files):
                ignore.append("*.bin")
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            local_files_only=offline,
            allow_patterns=["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"],
            ignore_patterns=ignore,
        )
        return Path(folder)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise BadInput(
            f"{uri} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or use a local path",
            field=FIELD,
        ) from None
    except (GatedRepoError, RepositoryNotFoundError):
        raise BadInput(
            f"{uri}: the repository does not exist or needs a token with access; check the name, and put HF_TOKEN "
            "in the Secret named by spec.baseModel.credentialsSecret",
            field=FIELD,
        ) from None
    except RevisionNotFoundError:
        raise BadInput(f"{uri} has no revision {revision!r}", field="spec.baseModel.revision") from None
    except EntryNotFoundError:
        raise BadInput(f"{uri}: no file {filename!r} in {repo_id}", field=FIELD) from None


# --- diffusers folders ---------------------------------------------------------------------------


def load_diffusers_folder(path: Path, *, model_type: ModelType) -> BaseModel:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / part).is_dir():
            raise BadInput(f"{path} has no {part}/ folder: not a Stable Diffusion pipeline folder", field=FIELD)
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    unet_config = _read_json(path / "unet" / "config.json")
    _check_family(model_type, width=unet_config.get("cross_attention_dim"), what=str(path))
    _check_prediction(model_type, scheduler_config.get("prediction_type"), what=str(path))
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} could not be loaded as a diffusers pipeline: {exc}", field=FIELD) from None
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        model_type=model_type,
        text_layout=text_layout_for(model_type),
        source=str(path),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} is missing or not valid JSON ({exc})", field=FIELD) from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a JSON object", field=FIELD)
    return data


def _family(width: Any) -> str | None:
    return {_V1_WIDTH: "v1x", _V2_WIDTH: "v2x"}.get(width) if isinstance(width, int) else None


def _check_family(model_type: ModelType, *, width: Any, what: str) -> None:
    family = _family(width)
    expected = "v1x" if model_type == ModelType.V1X else "v2x"
    if family is not None and family != expected:
        actual = "SD 1.x" if family == "v1x" else "SD 2.x"
        fix = "v1x" if family == "v1x" else "v2x-512 (512 px) or v2x (768 px)"
        raise BadInput(
            f"{model_type} does not match the model: {what} is an {actual} model (cross-attention width {width}); "
            f"set spec.baseModel.type to {fix}",
            field=TYPE_FIELD,
        )


def _check_prediction(model_type: ModelType, prediction: Any, *, what: str) -> None:
    expected = PREDICTION_TYPES[model_type]
    if prediction in ("epsilon", "v_prediction") and prediction != expected:
        fix = "v2x" if prediction == "v_prediction" else "v1x or v2x-512"
        raise BadInput(
            f"{model_type} trains with {expected} prediction, but {what} was trained with {prediction}; "
            f"set spec.baseModel.type to {fix}",
            field=TYPE_FIELD,
        )


# --- single files --------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a .safetensors or .ckpt file."""
    import torch

    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata  # noqa: SIM118
        # weights_only: a checkpoint from the internet must not run code when read.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInput(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})", field=FIELD) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise BadInput(f"{path} holds no state dict", field=FIELD)
    extra = {}
    if isinstance(loaded, dict) and isinstance(loaded.get("global_step"), int):
        extra[GLOBAL_STEP_KEY] = str(loaded["global_step"])
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, extra


# SD 2.0-base's released .ckpt was saved at this step; the 768 px v-prediction ones were not
# (diffusers' single-file loader tells them apart the same way).
SD2_BASE_GLOBAL_STEP = "875000"
GLOBAL_STEP_KEY = "global_step"


def detect_prediction_type(
    path: Path, metadata: dict[str, str], configs: dict[str, Any] | None
) -> tuple[str, str] | None:
    """What a single file says of its prediction type, and where it says it: the ``.yaml``
    beside it (the web UIs' convention), its model-spec or kohya metadata, the configs this
    trainer embeds, or the training step of a released SD 2.0-base checkpoint."""
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        found = original_config.prediction_type_of(original_config.read(beside))
        if found is not None:
            return found, f"{beside.name} beside it"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction"):
        return "v_prediction", "its modelspec.prediction_type metadata"
    if spec in ("epsilon", "eps"):
        return "epsilon", "its modelspec.prediction_type metadata"
    kohya = metadata.get("ss_v_parameterization", "").lower()
    if kohya in ("true", "false"):
        return ("v_prediction" if kohya == "true" else "epsilon"), "its ss_v_parameterization metadata"
    if configs and configs.get("model_type") and configs.get("scheduler", {}).get("prediction_type"):
        return str(configs["scheduler"]["prediction_type"]), "the configs in its metadata"
    if metadata.get(GLOBAL_STEP_KEY) == SD2_BASE_GLOBAL_STEP:
        return "epsilon", "its global_step (SD 2.0-base's)"
    return None


def load_single_file(path: Path, *, model_type: ModelType) -> BaseModel:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    checkpoint, metadata = read_checkpoint(path)
    if not any(k.startswith(convert.UNET_PREFIX) for k in checkpoint):
        raise BadInput(
            f"{path} is not a Stable Diffusion checkpoint in the original layout (no {convert.UNET_PREFIX}* keys)",
            field=FIELD,
        )
    layout = convert.detect_text_layout(checkpoint)
    expected_layout = text_layout_for(model_type)
    if layout is None:
        raise BadInput(f"{path} has no text encoder (cond_stage_model.*)", field=FIELD)
    if layout != expected_layout:
        actual = "an SD 1.x checkpoint (CLIP text encoder)" if layout == "clip" else "an SD 2.x checkpoint (OpenCLIP)"
        fix = "v1x" if layout == "clip" else "v2x-512 (512 px, epsilon) or v2x (768 px, v-prediction)"
        raise BadInput(
            f"{model_type} does not match the checkpoint: {path.name} is {actual}; set spec.baseModel.type to {fix}",
            field=TYPE_FIELD,
        )
    embedded = _embedded_configs(metadata)
    configs = embedded or _shipped_configs(model_type)
    # A v2 model's objective must not rest on the declared type alone: the wrong one trains
    # silently toward the wrong target.
    detected = detect_prediction_type(path, metadata, embedded)
    if detected is not None:
        _check_prediction(model_type, detected[0], what=f"{path.name} (as {detected[1]} says)")

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(configs["text_encoder"])))
    converted = convert.from_original(
        checkpoint,
        unet_keys=unet.state_dict(),
        unet_config=unet.config,
        vae_keys=vae.state_dict(),
        vae_config=vae.config,
        text_keys=text_encoder.state_dict(),
        text_layout=layout,
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
        ("text encoder", text_encoder, converted.text_encoder),
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
    # Buffers that a checkpoint does not carry are still on the meta device: rebuild them.
    _materialize_buffers(text_encoder)
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_single_file_tokenizer(path, layout),
        scheduler_config=dict(configs["scheduler"]),
        model_type=model_type,
        text_layout=layout,
        source=str(path),
        extras=converted.extras,
    )


def _materialize_buffers(module: Any) -> None:
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


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "model_type")}


def _embedded_configs(metadata: dict[str, str]) -> dict[str, Any] | None:
    raw = metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return None
    try:
        configs = json.loads(raw)
    except ValueError:
        return None
    return (
        configs
        if isinstance(configs, dict) and {"unet", "vae", "text_encoder", "scheduler"} <= configs.keys()
        else None
    )


def _shipped_configs(model_type: ModelType) -> dict[str, Any]:
    folder = CONFIGS / str(model_type)
    return {
        "unet": _read_json(folder / "unet" / "config.json"),
        "vae": _read_json(folder / "vae" / "config.json"),
        "text_encoder": _read_json(folder / "text_encoder" / "config.json"),
        "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json"),
    }


def _single_file_tokenizer(path: Path, layout: convert.TextLayout) -> Any:
    """A single file has no tokenizer: take the one beside it (``tokenizer/``, or the diffusers
    folder this trainer exports next to its single file), else the hub's (cached) one."""
    from transformers import CLIPTokenizer

    for candidate in (path.parent / "tokenizer", path.parent / "diffusers" / "tokenizer"):
        if candidate.is_dir():
            return CLIPTokenizer.from_pretrained(candidate)
    repo, subfolder = HUB_TOKENIZERS[layout]
    try:
        return CLIPTokenizer.from_pretrained(repo, subfolder=subfolder, local_files_only=hub_offline())
    except OSError:
        if not hub_offline():
            raise  # a failed download is worth a retry
        raise BadInput(
            f"{path.name} carries no tokenizer, {repo}'s is not in the Hugging Face cache "
            "and HF_HUB_OFFLINE is set; put a tokenizer/ folder (vocab.json, merges.txt) beside the checkpoint, "
            "or allow one download",
            field=FIELD,
        ) from None
