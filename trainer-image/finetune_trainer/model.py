"""The base model: from a diffusers folder, or one original-layout checkpoint file, found
locally, on the Hugging Face hub (``hf://``) or in object storage (``s3://``, ``gs://``,
``https://``); what differs between model families is the family's (``families/``).

A single file is read with this package's own configs (``configs/<type>/``) so that it
loads offline; one written by this trainer carries its exact configs in its metadata, so a
fine-tuned model can be the base of the next run whatever its size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import BaseModelSource, ModelType
from finetune_trainer import convert, credentials, flux_layout, original_config, storage
from finetune_trainer.errors import BadInput
from finetune_trainer.families import family_of
from finetune_trainer.families.base import (
    CONFIG_METADATA_KEY,
    CONFIGS,
    FIELD,
    TYPE_FIELD,
    BaseModel,
    LoadOptions,
    embedded_configs,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune_trainer")

VAE_FIELD = "spec.baseModel.vaeUri"
COMPONENTS_FIELD = "spec.baseModel.componentsUri"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_FAMILY_OF_SLOTS = {
    convert.SD1_TEXT: ("an SD 1.x checkpoint (CLIP text encoder)", "v1x"),
    convert.SD2_TEXT: ("an SD 2.x checkpoint (OpenCLIP)", "v2x-512 (512 px, epsilon) or v2x (768 px, v-prediction)"),
    convert.SDXL_TEXT: ("an SDXL checkpoint (two text encoders)", "sdxl"),
}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def load_base_model(
    source: BaseModelSource,
    *,
    cache_dir: Path,
    store: storage.ObjectStore | None = None,
    options: LoadOptions | None = None,
) -> BaseModel:
    """The base model, its parts as its family reads them (``options``: the run's precision,
    quantization and device, for a family that reads its denoiser straight onto the GPU)."""
    model_type = ModelType(source.type)
    family = family_of(model_type)
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
    if family.single_file_is_denoiser:
        base = _load_denoiser_family(source, path, cache_dir=cache_dir, store=store, options=options or LoadOptions())
    elif path.is_dir():
        base = family.load_folder(path, model_type=model_type)
    else:
        base = load_single_file(path, model_type=model_type)
    if source.vae_uri:
        base.vae = load_vae(source.vae_uri, cache_dir=cache_dir, store=store)
        base.vae_source = source.vae_uri
    return base


def _load_denoiser_family(
    source: BaseModelSource,
    path: Path,
    *,
    cache_dir: Path,
    store: storage.ObjectStore | None,
    options: LoadOptions,
) -> BaseModel:
    """A family whose single file is the denoiser alone (Flux): a folder holds everything, a file
    takes the rest from spec.baseModel.componentsUri."""
    model_type = ModelType(source.type)
    family = family_of(model_type)
    if path.is_dir():
        if source.components_uri:
            raise BadInput(
                f"{source.uri} is a diffusers folder with its own text encoders, VAE and scheduler; "
                "spec.baseModel.componentsUri is for a single-file transformer: remove it",
                field=COMPONENTS_FIELD,
            )
        return family.load_folder(path, model_type=model_type, options=options)
    components = None
    if source.components_uri:
        components = _locate_components(source.components_uri, cache_dir=cache_dir, store=store)
    return family.load_original_file(path, model_type=model_type, components=components, options=options)


def _locate_components(uri: str, *, cache_dir: Path, store: storage.ObjectStore | None) -> Path:
    family = family_of(ModelType.FLUX1)
    if storage.scheme(uri) == "hf":
        return _from_hub(
            uri, revision=None, cache_dir=cache_dir, patterns=family.component_patterns(), field=COMPONENTS_FIELD
        )
    fetched = storage.fetch(uri, field=COMPONENTS_FIELD, cache_dir=cache_dir, store=store)
    assert fetched is not None
    if not fetched.is_dir():
        raise BadInput(f"{uri} is not a folder: give a diffusers Flux.1 folder", field=COMPONENTS_FIELD)
    return fetched


def load_vae(uri: str, *, cache_dir: Path, store: storage.ObjectStore | None = None) -> Any:
    """A replacement VAE: a diffusers AutoencoderKL folder (its config.json and weights)."""
    import torch
    from diffusers import AutoencoderKL

    if storage.scheme(uri) == "hf":
        path = _from_hub(uri, revision=None, cache_dir=cache_dir, patterns=["*.json", "*.safetensors", "vae/*"])
    else:
        fetched = storage.fetch(uri, field=VAE_FIELD, cache_dir=cache_dir, store=store)
        assert fetched is not None
        path = fetched
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise BadInput(f"{uri} is not a diffusers VAE folder (no config.json)", field=VAE_FIELD)
    try:
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise BadInput(f"{uri} could not be loaded as a VAE: {exc}", field=VAE_FIELD) from None


def locate(source: BaseModelSource, *, cache_dir: Path, store: storage.ObjectStore | None = None) -> Path:
    """A local path for the base model, downloading it first where it is remote."""
    uri = source.uri
    if storage.scheme(uri) == "hf":
        return _from_hub(
            uri, revision=source.revision, cache_dir=cache_dir, patterns=family_of(source.type).hub_patterns()
        )
    path = storage.fetch(uri, field=FIELD, cache_dir=cache_dir, store=store)
    assert path is not None  # missing_ok is off: a missing model is bad input
    if not path.exists():
        raise BadInput(
            f"{path} does not exist; give the path of a diffusers folder or a .safetensors file", field=FIELD
        )
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise BadInput(f"{path} is not a .safetensors or .ckpt checkpoint nor a diffusers folder", field=FIELD)
    return path


def locate_uri(
    uri: str, *, field: str, patterns: list[str], cache_dir: Path, store: storage.ObjectStore | None = None
) -> Path:
    """A local path for a model other than the base (a scoring model): an hf:// repository's
    ``patterns``, a volume's folder, an object store's copy."""
    if storage.scheme(uri) == "hf":
        return _from_hub(uri, revision=None, cache_dir=cache_dir, patterns=patterns, field=field)
    path = storage.fetch(uri, field=field, cache_dir=cache_dir, store=store)
    if path is None or not path.exists():
        raise BadInput(f"{uri} does not exist; give a model's folder", field=field)
    return path


def _from_hub(uri: str, *, revision: str | None, cache_dir: Path, patterns: list[str], field: str = FIELD) -> Path:
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
        raise BadInput(f"{uri}: an hf:// URI is hf://OWNER/REPO or hf://OWNER/REPO/FILE.safetensors", field=field)
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    token = credentials.hf_token()
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
            allow_patterns=patterns,
            ignore_patterns=ignore,
        )
        return Path(folder)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise BadInput(
            f"{uri} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or use a local path",
            field=field,
        ) from None
    except (GatedRepoError, RepositoryNotFoundError):
        raise BadInput(
            f"{uri}: the repository does not exist or needs a token with access; check the name, and put HF_TOKEN "
            "in the Secret named by spec.baseModel.credentialsSecret",
            field=field,
        ) from None
    except RevisionNotFoundError:
        raise BadInput(f"{uri} has no revision {revision!r}", field="spec.baseModel.revision") from None
    except EntryNotFoundError:
        raise BadInput(f"{uri}: no file {filename!r} in {repo_id}", field=field) from None


# --- single files ---------------------------------------------------------------------------------


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
    family = family_of(model_type)
    checkpoint, metadata = read_checkpoint(path)
    if flux_layout.is_original(set(checkpoint)):
        raise BadInput(
            f"{model_type} does not match the checkpoint: {path.name} is a Flux.1 transformer; set "
            "spec.baseModel.type to flux1 and spec.baseModel.componentsUri to a diffusers Flux.1 folder",
            field=TYPE_FIELD,
        )
    if not any(k.startswith(convert.UNET_PREFIX) for k in checkpoint):
        raise BadInput(
            f"{path} is not a Stable Diffusion checkpoint in the original layout (no {convert.UNET_PREFIX}* keys)",
            field=FIELD,
        )
    slots = convert.detect_text_slots(checkpoint)
    if slots is None:
        raise BadInput(f"{path} has no text encoder (cond_stage_model.* or conditioner.embedders.*)", field=FIELD)
    if slots != family.slots_for(model_type):
        actual, fix = _FAMILY_OF_SLOTS[slots]
        raise BadInput(
            f"{model_type} does not match the checkpoint: {path.name} is {actual}; set spec.baseModel.type to {fix}",
            field=TYPE_FIELD,
        )
    embedded = embedded_configs(metadata, family.text_encoder_parts)
    # A model's objective must not rest on the declared type alone: the wrong one trains
    # silently toward the wrong target.
    detected = detect_prediction_type(path, metadata, embedded)
    if detected is not None:
        family.check_prediction(model_type, detected[0], what=f"{path.name} (as {detected[1]} says)")
    tokenizers = single_file_tokenizers(path, family.tokenizer_parts, family.hub_tokenizers_for(model_type))
    return family.load_single_file(
        path, model_type=model_type, checkpoint=checkpoint, metadata=metadata, tokenizers=tokenizers
    )


def single_file_tokenizers(path: Path, parts: tuple[str, ...], hub: tuple[tuple[str, str], ...]) -> list[Any]:
    """A single file has no tokenizers: take those beside it (``tokenizer/``, ``tokenizer_2/``,
    or in the diffusers folder this trainer exports next to its single file), else the hub's
    (cached) ones."""
    from transformers import CLIPTokenizer

    found: list[Any] = []
    for part, (repo, subfolder) in zip(parts, hub, strict=True):
        local = next((c for c in (path.parent / part, path.parent / "diffusers" / part) if c.is_dir()), None)
        if local is not None:
            found.append(CLIPTokenizer.from_pretrained(local))
            continue
        try:
            found.append(CLIPTokenizer.from_pretrained(repo, subfolder=subfolder, local_files_only=hub_offline()))
        except OSError:
            if not hub_offline():
                raise  # a failed download is worth a retry
            raise BadInput(
                f"{path.name} carries no tokenizer, {repo}'s is not in the Hugging Face cache "
                f"and HF_HUB_OFFLINE is set; put a {part}/ folder (vocab.json, merges.txt) beside the checkpoint, "
                "or allow one download",
                field=FIELD,
            ) from None
    return found


__all__ = ["CONFIGS", "CONFIG_METADATA_KEY", "BaseModel", "load_base_model"]
