"""LoRA: low-rank adapters on the UNet's transformer blocks (and optionally the text
encoder's layers), trained while the base model stays frozen, and the files people load them from.

Which layers (``spec.training.lora.targets``):

- ``kohya`` (the default): what kohya's scripts and the web UIs' LoRA files adapt, every linear
  and 1x1 projection of each transformer block (attention, feed-forward, ``proj_in``/``proj_out``)
  and of each text-encoder layer (attention and MLP).  "Rank 8" means the same as there.
- ``attention``: the attention projections only, as diffusers' ``train_dreambooth_lora.py``;
  about a third of the weights at the same rank.

- ``lora/pytorch_lora_weights.safetensors``: diffusers' layout with the adapter's config in
  the metadata, so ``pipeline.load_lora_weights("<output>/lora")`` applies it at its alpha.
- ``<name>-lora.safetensors``: the layout the web UIs and kohya's scripts read
  (``lora_unet_*`` / ``lora_te_*`` with ``lora_down``/``lora_up`` and an ``.alpha`` per module).

The kinds of adapter (``spec.training.lora.type``), all trained with peft's implementations
(the library diffusers' own LoRA loading is built on; the LyCORIS package's loader reads the
files in the tests):

- ``lora``: B x A x alpha / rank.
- ``locon``: LoRA on the UNet's ResNet convolutions, time projections and down/upsamplers too,
  at the same rank (LyCORIS' LoCon with conv_dim = dim); the kohya-layout file has LoRA's names.
- ``dora``: LoRA with the weight's magnitude trained apart from its direction (peft's
  ``use_dora``); the kohya-layout file adds a ``dora_scale`` per output row, as LyCORIS writes it.
- ``loha``: (w1a x w1b) * (w2a x w2b) x alpha / rank (LyCORIS' ``hada_*`` names, peft's too).
- ``lokr``: kron(w1, w2) x alpha / rank, either factor possibly low-rank (``lokr_*``).  The
  kohya-layout file holds both factors whole, peft's scale inside ``lokr_w1``: every reader
  scales a LoKr of whole factors by 1 (see ``lycoris_layer``).

diffusers' ``load_lora_weights`` reads ``lora`` and ``dora``; for ``loha`` and ``lokr`` the
``lora/`` folder holds peft's own layout instead (``lora/unet/adapter_config.json`` and
``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(pipe.unet, "lora/unet")``
loads.

What it costs: only the adapters get gradients and optimizer state (megabytes instead of
gigabytes), and the frozen UNet runs in the mixed precision, so a LoRA run needs a fraction
of DreamBooth's memory; checkpoints hold the adapters only.  The update is scaled by
``alpha / rank``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.v1alpha1 import LoRASettings, LoRATargets, LoRAType, ModelType
from finetune_trainer import storage, textual_inversion
from finetune_trainer.errors import TrainerError

if TYPE_CHECKING:
    import torch

    from finetune_trainer.families import ModelFamily

LORA_DIR = "lora"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_FILE = "adapter_config.json", "adapter_model.safetensors"
# The kinds diffusers' load_lora_weights reads; the others export peft's own layout in lora/.
DIFFUSERS_KINDS = (LoRAType.LORA, LoRAType.LOCON, LoRAType.DORA)
UNET_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
# peft matches a name against the end of each module's path: these are the linear and 1x1
# convolution layers of diffusers' Transformer2DModel blocks, and CLIP's MLP.
UNET_TARGETS = {
    LoRATargets.KOHYA: (*UNET_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    LoRATargets.ATTENTION: UNET_ATTENTION,
}
# LoCon's further layers: what LyCORIS' kohya network adapts in diffusers' ResnetBlock2D,
# Downsample2D and Upsample2D (3x3 convolutions, the 1x1 shortcut, the time projection).
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ENCODER_TARGETS = {
    LoRATargets.KOHYA: (*TEXT_ENCODER_ATTENTION, "fc1", "fc2"),
    LoRATargets.ATTENTION: TEXT_ENCODER_ATTENTION,
}


def lora_config(settings: LoRASettings, targets: tuple[str, ...] | str) -> Any:
    # A string is a regular expression peft matches against a module's whole path.
    modules = targets if isinstance(targets, str) else list(targets)
    kind = LoRAType(settings.type)
    if kind == LoRAType.LOHA:
        from peft import LoHaConfig

        # init_weights: w2's second factor zero, so the adapted model starts out as the base.
        return LoHaConfig(r=settings.rank, alpha=settings.alpha, target_modules=modules, init_weights=True)  # type: ignore[arg-type]
    if kind == LoRAType.LOKR:
        from peft import LoKrConfig

        return LoKrConfig(
            r=settings.rank,
            alpha=settings.alpha,  # type: ignore[arg-type]
            target_modules=modules,
            decompose_both=bool(settings.decompose_both),
            decompose_factor=-1 if settings.factor is None else settings.factor,
            init_weights=True,
        )
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        # peft annotates an int, but any number works: the scale is lora_alpha / r.
        lora_alpha=settings.alpha,  # type: ignore[arg-type]
        lora_dropout=settings.dropout,
        # A gaussian, B zero: the adapted model starts out as the base model.
        init_lora_weights="gaussian",
        target_modules=modules,
        use_dora=kind == LoRAType.DORA,
    )


def add_adapters(
    unet: Any, text_encoders: list[Any], settings: LoRASettings, *, family: ModelFamily | None = None
) -> None:
    """Put trainable LoRA layers on the UNet (and the text encoders given); everything else
    stays frozen.  The adapters are fp32 whatever the base model's precision."""
    import torch

    targets = LoRATargets(settings.targets)
    unet_targets, text_targets = (
        family.lora_targets(targets) if family is not None else (UNET_TARGETS[targets], TEXT_ENCODER_TARGETS[targets])
    )
    if settings.type == LoRAType.LOCON:
        if isinstance(unet_targets, str):
            raise TrainerError(
                f"lora.type locon: the {family.name if family else 'model'} denoiser has no convolutions"
            )
        unet_targets = (*unet_targets, *UNET_CONV_TARGETS)
    unet.add_adapter(lora_config(settings, unet_targets))
    if family is not None:
        text_encoders = adapted(family, text_encoders)
    for text_encoder in text_encoders:
        text_encoder.add_adapter(lora_config(settings, text_targets))
    for model in (unet, *text_encoders):
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.float32)


def adapted(family: ModelFamily, text_encoders: list[Any]) -> list[Any]:
    """The text encoders that take adapters with lora.trainTextEncoder (Flux: CLIP, not T5)."""
    if family.adapted_text_encoders is None:
        return list(text_encoders)
    return [text_encoders[i] for i in family.adapted_text_encoders if i < len(text_encoders)]


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights of a model, by peft's names (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    # Not the embedding table, which peft would add for a model whose table grew (pivotal
    # tuning's new word, kept apart from the adapters).
    return dict(get_peft_model_state_dict(model, save_embedding_layers=False))


def load_adapter_state(model: Any, state: dict[str, torch.Tensor], *, source: str) -> None:
    from peft.utils import set_peft_model_state_dict

    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TrainerError(
            f"{source} does not hold this run's adapters (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    set_peft_model_state_dict(model, state)


def register_checkpoint_hooks(accelerator: Any, learned: textual_inversion.Learned | None = None) -> None:
    """Checkpoints of a LoRA run hold the adapters, not the frozen base model: accelerate's
    model files are swapped for the adapter weights on save and read back on load.  With
    pivotal tuning (``learned``) each text encoder's file holds the new word's vectors too
    (the text encoders come after the UNet, in the order the run prepared them)."""
    from safetensors.torch import load_file

    def save(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for index, wrapped in enumerate(models):
            if index < len(weights):
                model = accelerator.unwrap_model(wrapped)
                state = adapter_state(model) if hasattr(model, "peft_config") else {}
                if learned is not None and index > 0:
                    state[textual_inversion.CHECKPOINT_KEY] = learned.one(index - 1).vectors([model])[0]
                weights[index] = state

    def load(models: list[Any], input_dir: str) -> None:
        for index, wrapped in enumerate(list(models)):
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            path = Path(input_dir) / name
            model = accelerator.unwrap_model(wrapped)
            state = load_file(str(path))
            if learned is not None and index > 0:
                learned.one(index - 1).load_checkpoint([model], state, source=path)
            if hasattr(model, "peft_config"):
                load_adapter_state(model, state, source=str(path))
            elif state:
                raise TrainerError(f"{path} holds weights this run does not train ({sorted(state)[:3]})")
        models.clear()  # loaded here; accelerate must not load them again as full models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# --- files people load -----------------------------------------------------------------------------


def _text_model_name(module: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel; every LoRA file in circulation names the
    # text encoder's modules as the older versions did, under ``text_model.``.
    return module if module.startswith("text_model.") else f"text_model.{module}"


def diffusers_layers(state: dict[str, torch.Tensor], *, text_encoder: bool, dtype: torch.dtype) -> dict[str, Any]:
    """peft's own names (``...to_q.lora_A.weight``), which ``load_lora_weights`` reads as they are.
    (diffusers' ``convert_state_dict_to_diffusers`` renames only the attention layers to its
    older ``lora.down``/``lora.up`` names and leaves the feed-forward and projection layers as
    they were: a file mixing both loads with those layers missing.)"""
    layers = {_weight_name(k): v.detach().to(dtype).cpu().contiguous() for k, v in state.items()}
    return {_text_model_name(k): v for k, v in layers.items()} if text_encoder else layers


def _weight_name(key: str) -> str:
    # DoRA's magnitude is ``...lora_magnitude_vector`` in peft's state dict; transformers' adapter
    # loader (5.23) maps only names that end in ``.weight`` onto the adapter's parameters, so a
    # text encoder's magnitude named so would stay at its fresh value.  diffusers reads both.
    return f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key


def inference_config(model: Any) -> dict[str, Any]:
    """The adapter's config as a loader should rebuild it: rank, alpha and targets, without
    the training-time dropout.  diffusers' ``load_lora_weights`` leaves the dropout layers it
    creates in training mode, so a file that declared dropout would give noisy, different
    images on every call (checked with diffusers 0.42)."""
    config = dict(model.peft_config["default"].to_dict())
    config["lora_dropout"] = 0.0
    return config


def export_diffusers(
    family: ModelFamily, unet: Any, text_encoders: list[Any], dest_dir: Path, *, dtype: torch.dtype
) -> Path:
    """``dest_dir/pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights(dest_dir)``."""
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class)
    denoiser = family.denoiser_part
    layers: dict[str, Any] = {
        f"{denoiser}_lora_layers": diffusers_layers(adapter_state(unet), text_encoder=False, dtype=dtype),
        f"{denoiser}_lora_adapter_metadata": inference_config(unet),
    }
    for part, encoder in zip(family.text_encoder_parts, text_encoders, strict=False):
        layers[f"{part}_lora_layers"] = diffusers_layers(adapter_state(encoder), text_encoder=True, dtype=dtype)
        layers[f"{part}_lora_adapter_metadata"] = inference_config(encoder)
    with storage.atomic_path(dest_dir) as tmp:
        pipeline_class.save_lora_weights(tmp, **layers)
        storage.make_readable(tmp)
    return dest_dir / DIFFUSERS_FILE


def export_peft(
    family: ModelFamily, unet: Any, text_encoders: list[Any], dest_dir: Path, *, dtype: torch.dtype
) -> Path:
    """peft's own layout, one folder per adapted part (``dest_dir/unet``, ``dest_dir/text_encoder``):
    ``adapter_config.json`` and ``adapter_model.safetensors``, what ``PeftModel.from_pretrained``
    reads.  For the kinds diffusers' ``load_lora_weights`` does not read (LoHa, LoKr)."""
    from safetensors.torch import save_file

    parts = [(family.denoiser_part, unet), *zip(family.text_encoder_parts, text_encoders, strict=False)]
    with storage.atomic_path(dest_dir) as tmp:
        for part, model in parts:
            folder = tmp / part
            folder.mkdir(parents=True)
            model.peft_config["default"].save_pretrained(str(folder))
            # Named from the PeftModel that wraps the model, as PeftModel.save_pretrained names them.
            tensors = {
                f"base_model.model.{k}": v.detach().to(dtype).cpu().contiguous()
                for k, v in adapter_state(model).items()
            }
            save_file(tensors, str(folder / PEFT_FILE), metadata={"format": "pt"})
        storage.make_readable(tmp)
    return dest_dir


def kohya_state_dict(
    family: ModelFamily,
    unet: Any,
    text_encoders: list[Any],
    *,
    alpha: float,
    dtype: torch.dtype,
    kind: LoRAType = LoRAType.LORA,
    rank: int = 0,
) -> dict[str, torch.Tensor]:
    """peft adapter weights -> kohya's layout: ``lora_unet_<module>`` (named as kohya's scripts
    name the family's modules, some fused: see ``ModelFamily.kohya_unet_layers``) and
    ``lora_te<n>_<module>``, dots as underscores, with ``.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha``; the other kinds in LyCORIS' names (``lycoris_layers``)."""
    if kind not in (LoRAType.LORA, LoRAType.LOCON):
        return lycoris_tensors(
            family,
            unet,
            adapter_state(unet),
            [adapter_state(e) for e in text_encoders],
            kind=kind,
            alpha=alpha,
            rank=rank,
            dtype=dtype,
        )
    return kohya_tensors(
        family,
        unet,
        adapter_pairs(adapter_state(unet)),
        [adapter_pairs(adapter_state(e)) for e in text_encoders],
        alpha=alpha,
        dtype=dtype,
    )


def kohya_tensors(
    family: ModelFamily,
    unet: Any,
    unet_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    text_pairs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
    *,
    alpha: float,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Adapters given as module -> (A, B), the denoiser's and each adapted text encoder's, in
    kohya's layout (``unet`` for its module names and sizes)."""
    import torch

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {
        f"lora_unet_{name}": layer for name, layer in family.kohya_unet_layers(unet_pairs, unet, alpha=alpha).items()
    }
    for prefix, pairs in zip(family.kohya_text_prefixes, text_pairs, strict=False):
        for module, (down, up) in pairs.items():
            layers[f"{prefix}_{_text_model_name(module).replace('.', '_')}"] = (down, up, alpha)
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in layers.items():
        out[f"{name}.lora_down.weight"] = down.detach().to(dtype).cpu().contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to(dtype).cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(scale), dtype=dtype)
    return out


def adapter_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's ``<module>.lora_A.weight`` / ``.lora_B.weight`` -> module -> (A, B)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"unexpected adapter weight {key!r}")
        halves.setdefault(module, {})[kind[0]] = tensor
    return {module: (pair["A"], pair["B"]) for module, pair in halves.items()}


def by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft's names -> module -> its weights by peft's kind (``lora_A``, ``lora_magnitude_vector``,
    ``hada_w1_a``, ``lokr_w1``...)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.removesuffix(".weight").rpartition(".")
        if not kind.startswith(("lora_", "hada_", "lokr_")):
            raise ValueError(f"unexpected adapter weight {key!r}")
        out.setdefault(module, {})[kind] = tensor
    return out


def lycoris_layer(
    kind: LoRAType, weights: dict[str, torch.Tensor], *, alpha: float, rank: int, kernel: tuple[int, ...] = ()
) -> dict[str, Any]:
    """One module's peft weights as the kohya-layout file names them for LyCORIS' kinds (suffix ->
    tensor, ``alpha`` a number), so that LyCORIS' loader and the web UIs rebuild peft's update.
    ``kernel``: the module's kernel size for a convolution."""
    if kind == LoRAType.DORA:
        down, up = weights["lora_A"], weights["lora_B"]
        # peft's magnitude (one per output row: (out,), or (1, out, 1, 1) for a convolution) as
        # LyCORIS' dora_scale with its default wd_on_out: (out, 1) or (out, 1, 1, 1).
        magnitude = weights["lora_magnitude_vector"].reshape(up.shape[0], *[1] * (down.dim() - 1))
        return {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": magnitude, "alpha": alpha}
    if kind == LoRAType.LOHA:
        return {**weights, "alpha": alpha}
    # LoKr: kron(w1, w2) x alpha / rank in peft, either factor possibly low-rank.  The file holds
    # both factors whole (w1 = w1_a w1_b, w2 = w2_a w2_b) with peft's scale inside w1: LyCORIS, the
    # web UIs and InvokeAI all scale a LoKr of whole factors by 1 (alpha plays no part), and
    # InvokeAI 6.14's probe recognises an SD LoKr only so.  A whole factor costs little: w1 is
    # factor x factor, w2 the weight's sides divided by the factor.
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    if "lokr_w2" in weights:
        w2 = weights["lokr_w2"]
    else:
        w2 = (weights["lokr_w2_a"] @ weights["lokr_w2_b"]).reshape(weights["lokr_w2_a"].shape[0], -1, *kernel)
    return {"lokr_w1": w1 * (alpha / rank), "lokr_w2": w2, "alpha": 1.0}


def _kernel(module: Any) -> tuple[int, ...]:
    """A module's kernel size (a convolution's), () for a linear layer; under peft's adapter."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return tuple(base.weight.shape[2:])


def lycoris_tensors(
    family: ModelFamily,
    unet: Any,
    unet_state: dict[str, torch.Tensor],
    text_states: list[dict[str, torch.Tensor]],
    *,
    kind: LoRAType,
    alpha: float,
    rank: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """LoRA's other kinds in the kohya layout, LyCORIS' names for their weights (see
    ``lycoris_layer``): one layer per adapted module (Flux, whose layout fuses modules, takes
    ``lora`` only)."""
    import torch

    layers: dict[str, dict[str, torch.Tensor]] = {
        f"lora_unet_{family.kohya_unet_name(m, unet.config)}": w for m, w in by_module(unet_state).items()
    }
    kernels = {
        f"lora_unet_{family.kohya_unet_name(m, unet.config)}": _kernel(unet.get_submodule(m))
        for m in by_module(unet_state)
    }
    for prefix, state in zip(family.kohya_text_prefixes, text_states, strict=False):
        for module, weights in by_module(state).items():
            layers[f"{prefix}_{_text_model_name(module).replace('.', '_')}"] = weights
    out: dict[str, torch.Tensor] = {}
    for name, weights in layers.items():
        for suffix, value in lycoris_layer(kind, weights, alpha=alpha, rank=rank, kernel=kernels.get(name, ())).items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            out[f"{name}.{suffix}"] = tensor.detach().to(dtype).cpu().contiguous()
    return out


def network_args(settings: LoRASettings) -> dict[str, Any]:
    """What kohya's scripts record of the network (``ss_network_args``): LyCORIS' ``algo`` and the
    settings of each kind, as its kohya network module takes them."""
    kind = LoRAType(settings.type)
    if kind == LoRAType.LORA:
        return {"dropout": settings.dropout}
    args: dict[str, Any] = {"algo": "lora" if kind == LoRAType.DORA else str(kind)}
    if kind == LoRAType.LOCON:
        args |= {"conv_dim": settings.rank, "conv_alpha": settings.alpha, "dropout": settings.dropout}
    if kind == LoRAType.DORA:
        args |= {"dora_wd": True, "wd_on_output": True, "dropout": settings.dropout}
    if kind == LoRAType.LOKR:
        args |= {
            "factor": -1 if settings.factor is None else settings.factor,
            "decompose_both": bool(settings.decompose_both),
        }
    return args


def export_kohya(
    family: ModelFamily,
    unet: Any,
    text_encoders: list[Any],
    dest: Path,
    *,
    settings: LoRASettings,
    model_type: ModelType,
    title: str,
    step: int,
    dtype: torch.dtype,
    architecture: str,
) -> Path:
    from safetensors.torch import save_file

    kind = LoRAType(settings.type)
    tensors = kohya_state_dict(
        family, unet, text_encoders, alpha=settings.alpha, dtype=dtype, kind=kind, rank=settings.rank
    )
    metadata = {
        "format": "pt",
        "ss_network_module": family.kohya_network_module if kind == LoRAType.LORA else "lycoris.kohya",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_args": json.dumps(network_args(settings)),
        "finetune.lora_targets": str(settings.targets),
        "ss_base_model_version": family.kohya_base_version(model_type),
        "ss_v2": str(model_type in (ModelType.V2X, ModelType.V2X_512)),
        "ss_steps": str(step),
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
    }
    if model_type == ModelType.V2X:
        metadata["ss_v_parameterization"] = "True"
    with storage.atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        storage.make_readable(tmp)
    return dest


def merge(unet: Any, text_encoders: list[Any]) -> None:
    """Fold the adapters into the base weights and remove them: plain diffusers/transformers
    models again, which export as a full model."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in (unet, *text_encoders):
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(model)
        # Without this, save_pretrained would write the (now absent) adapter instead of the model.
        if hasattr(model, "peft_config"):
            del model.peft_config
        if getattr(model, "_hf_peft_config_loaded", False):
            model._hf_peft_config_loaded = False
