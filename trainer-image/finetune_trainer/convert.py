"""Key layouts: diffusers' models <-> one Stable Diffusion checkpoint in the original layout.

The original (CompVis/Stability "LDM", and for SDXL "SGM") layout is what the web UIs load: one
state dict with ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text
encoders, each in a *slot*: ``cond_stage_model.transformer.*`` for SD 1.x's CLIP,
``cond_stage_model.model.*`` for SD 2.x's OpenCLIP, ``conditioner.embedders.0.transformer.*``
(CLIP) and ``conditioner.embedders.1.model.*`` (OpenCLIP, with its text projection) for SDXL.

Every map is computed from a model's own keys and config, never from a table of SD 1.5's
names, so the same code serves the real architectures and the tiny test model (any number
of blocks and layers).  Both directions use the same map, which is what makes a round trip
exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

TextLayout = Literal["clip", "open_clip"]


@dataclass(frozen=True)
class TextSlot:
    """Where one text encoder sits in an original-layout checkpoint, and in which layout."""

    layout: TextLayout
    prefix: str


SD1_TEXT = (TextSlot("clip", "cond_stage_model.transformer."),)
SD2_TEXT = (TextSlot("open_clip", "cond_stage_model.model."),)
SDXL_TEXT = (
    TextSlot("clip", "conditioner.embedders.0.transformer."),
    TextSlot("open_clip", "conditioner.embedders.1.model."),
)

StateDict = dict[str, torch.Tensor]


# --- UNet ---------------------------------------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _per_block(value: int | Iterable[int], blocks: int) -> list[int]:
    return [int(value)] * blocks if isinstance(value, int) else [int(v) for v in value]


def _resnet_tail(tail: str, names: Mapping[str, str]) -> str:
    head, _, rest = tail.partition(".")
    return f"{names.get(head, head)}.{rest}" if rest else names.get(head, head)


def unet_key_map(keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> original key (without ``model.diffusion_model.``)."""
    down_types: list[str] = list(config["down_block_types"])
    up_types: list[str] = list(config["up_block_types"])
    down_layers = _per_block(config["layers_per_block"], len(down_types))
    # Up block i mirrors down block n-1-i and has one layer more (it also takes the skip
    # from the downsampler or conv_in).
    up_layers = [n + 1 for n in reversed(down_layers)]

    down_start: list[int] = []
    index = 1  # input_blocks.0 is conv_in
    for i, layers in enumerate(down_layers):
        down_start.append(index)
        index += layers + (1 if i < len(down_types) - 1 else 0)
    up_start: list[int] = []
    index = 0
    for layers in up_layers:
        up_start.append(index)
        index += layers

    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        # SDXL's embedding of the pooled text and the size/crop conditioning.
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    mapping: dict[str, str] = {}
    for key in keys:
        for old, new in fixed.items():
            if key.startswith(old):
                mapping[key] = new + key[len(old) :]
                break
        else:
            mapping[key] = _unet_block_key(
                key,
                down_start=down_start,
                down_layers=down_layers,
                up_start=up_start,
                up_layers=up_layers,
                up_types=up_types,
            )
    return mapping


def _unet_block_key(
    key: str,
    *,
    down_start: list[int],
    down_layers: list[int],
    up_start: list[int],
    up_layers: list[int],
    up_types: list[str],
) -> str:
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, tail = int(m[1]), m[2], int(m[3]), m[4]
        where = f"input_blocks.{down_start[block] + layer}"
        return f"{where}.0.{_resnet_tail(tail, _UNET_RESNET)}" if kind == "resnets" else f"{where}.1.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        return f"input_blocks.{down_start[block] + down_layers[block]}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, tail = int(m[1]), m[2], int(m[3]), m[4]
        where = f"output_blocks.{up_start[block] + layer}"
        return f"{where}.0.{_resnet_tail(tail, _UNET_RESNET)}" if kind == "resnets" else f"{where}.1.{tail}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the block's last layer: after its attention where it has one.
        slot = 2 if "CrossAttn" in up_types[block] else 1
        return f"output_blocks.{up_start[block] + up_layers[block] - 1}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original-layout name for UNet key {key!r} (not a Stable Diffusion UNet?)")


# --- VAE ----------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_attention_tail(tail: str) -> str:
    for old, new in _VAE_ATTENTION.items():
        if tail.startswith(old + "."):
            return new + tail[len(old) :]
    return tail


def vae_key_map(keys: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL key -> original key (without ``first_stage_model.``)."""
    blocks = len(config["up_block_types"])
    mapping: dict[str, str] = {}
    for key in keys:
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_vae_attention_tail(m[2])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # The original decoder numbers its levels from the finest up; diffusers in
            # the order they run.
            new = f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        mapping[key] = new
    return mapping


def _is_vae_attention_weight(original_key: str) -> bool:
    # The original VAE's attention projections are 1x1 convolutions; diffusers' are linear.
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


# --- text encoders ------------------------------------------------------------------------------


def _strip_text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); older versions and
    # most checkpoints still carry it.
    return key.removeprefix("text_model.")


def _text_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if _strip_text_model(k) != "embeddings.position_ids"]


def clip_key_map(keys: Iterable[str], slot: TextSlot = SD1_TEXT[0]) -> dict[str, str]:
    """CLIPTextModel key -> original key (with its slot's prefix)."""
    return {key: f"{slot.prefix}text_model.{_strip_text_model(key)}" for key in keys}


_OPEN_CLIP_NAMES = (
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
)
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")
# CLIPTextModelWithProjection's projection (SDXL's second encoder): a Linear whose weight is
# the transpose of OpenCLIP's ``text_projection`` matrix.
_PROJECTION = "text_projection.weight"


def open_clip_key_map(keys: Iterable[str], slot: TextSlot = SD2_TEXT[0]) -> dict[str, str]:
    """CLIPTextModel(WithProjection) key -> original OpenCLIP key, except q/k/v, which the
    original keeps as one ``in_proj`` tensor, and the projection, which it keeps transposed
    (see ``to_original`` and ``from_original``)."""
    mapping: dict[str, str] = {}
    for key in keys:
        plain = _strip_text_model(key)
        if _QKV.fullmatch(plain) or plain in ("embeddings.position_ids", _PROJECTION):
            continue
        for pattern, replacement in _OPEN_CLIP_NAMES:
            if re.fullmatch(pattern, plain):
                mapping[key] = slot.prefix + re.sub(pattern, replacement, plain)
                break
        else:
            raise ValueError(f"no OpenCLIP name for text encoder key {key!r}")
    return mapping


def detect_text_slots(checkpoint: Mapping[str, Any]) -> tuple[TextSlot, ...] | None:
    """Which text encoders an original-layout checkpoint holds (None: none it knows)."""
    if any(k.startswith(SDXL_TEXT[1].prefix) for k in checkpoint):
        return SDXL_TEXT
    if any(k.startswith(SD1_TEXT[0].prefix) for k in checkpoint):
        return SD1_TEXT
    if any(k.startswith(SD2_TEXT[0].prefix) for k in checkpoint):
        return SD2_TEXT
    return None


def _text_to_original(text: StateDict, slot: TextSlot) -> StateDict:
    out: StateDict = {}
    text = {k: v for k, v in text.items() if _strip_text_model(k) != "embeddings.position_ids"}
    if slot.layout == "clip":
        for key, new in clip_key_map(text, slot).items():
            out[new] = text[key]
        table = text[_find(text, "embeddings.position_embedding.weight")]
        # SD 1.x checkpoints carry CLIP's position ids; some loaders expect them.  (Made beside
        # the weights, like every tensor of the state dict.)
        ids = torch.arange(table.shape[0], dtype=torch.int64, device=table.device)[None]
        out[f"{slot.prefix}text_model.embeddings.position_ids"] = ids
        return out
    for key, new in open_clip_key_map(text, slot).items():
        out[new] = text[key]
    layers = sorted({int(m[1]) for k in text if (m := _QKV.fullmatch(_strip_text_model(k)))})
    for layer in layers:
        for kind in ("weight", "bias"):
            parts = [text[_find(text, f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}")] for p in "qkv"]
            out[f"{slot.prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
    if _PROJECTION in text:
        out[f"{slot.prefix}text_projection"] = text[_PROJECTION].t().contiguous()
    return out


def _text_from_original(
    checkpoint: Mapping[str, torch.Tensor], keys: list[str], slot: TextSlot, missing: list[str]
) -> tuple[StateDict, set[str]]:
    """One text encoder's state dict from its slot, and the checkpoint keys it used."""
    text: StateDict = {}
    used: set[str] = set()
    if slot.layout == "clip":
        for key in keys:
            plain = _strip_text_model(key)
            for source in (f"{slot.prefix}text_model.{plain}", f"{slot.prefix}{plain}"):
                if source in checkpoint:
                    text[key] = checkpoint[source]
                    used.add(source)
                    break
            else:
                missing.append(key)
        used.add(f"{slot.prefix}text_model.embeddings.position_ids")
        return text, used
    mapping = open_clip_key_map(keys, slot)
    for key, source in mapping.items():
        if source in checkpoint:
            text[key] = checkpoint[source]
            used.add(source)
        else:
            missing.append(key)
    width = next((v.shape[0] for k, v in text.items() if _strip_text_model(k) == "final_layer_norm.weight"), 0)
    for key in keys:
        plain = _strip_text_model(key)
        if plain == _PROJECTION:
            source = f"{slot.prefix}text_projection"
            if source in checkpoint:
                text[key] = checkpoint[source].t().contiguous()
                used.add(source)
            else:
                missing.append(key)
            continue
        m = _QKV.fullmatch(plain)
        if not m:
            continue
        source = f"{slot.prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
        if source not in checkpoint:
            missing.append(key)
            continue
        used.add(source)
        part = "qkv".index(m[2])
        text[key] = checkpoint[source][part * width : (part + 1) * width]
    return text, used


# --- whole checkpoints --------------------------------------------------------------------------


@dataclass
class Components:
    """The models' state dicts in diffusers' layout, and what the converter needs to know."""

    unet: StateDict
    vae: StateDict
    texts: list[StateDict]
    unet_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    slots: tuple[TextSlot, ...]
    # Original-layout tensors with no diffusers counterpart that belong in a re-export
    # (SD 2.x's last OpenCLIP layer and text projection, which SD does not use).
    extras: StateDict = field(default_factory=dict)


def to_original(components: Components) -> StateDict:
    """One original-layout state dict from the diffusers models."""
    out: StateDict = {}
    unet_map = unet_key_map(components.unet, components.unet_config)
    for key, tensor in components.unet.items():
        out[UNET_PREFIX + unet_map[key]] = tensor
    vae_map = vae_key_map(components.vae, components.vae_config)
    for key, tensor in components.vae.items():
        new = vae_map[key]
        out[VAE_PREFIX + new] = tensor[:, :, None, None] if _is_vae_attention_weight(new) else tensor
    for text, slot in zip(components.texts, components.slots, strict=True):
        out.update(_text_to_original(text, slot))
    for key, tensor in components.extras.items():
        out.setdefault(key, tensor)
    return out


def _find(state: Mapping[str, Any], plain: str) -> str:
    for candidate in (plain, "text_model." + plain):
        if candidate in state:
            return candidate
    raise KeyError(plain)


@dataclass
class Converted:
    unet: StateDict
    vae: StateDict
    texts: list[StateDict]
    extras: StateDict
    missing: list[str]  # diffusers keys the checkpoint did not provide


def from_original(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    unet_keys: Iterable[str],
    unet_config: Mapping[str, Any],
    vae_keys: Iterable[str],
    vae_config: Mapping[str, Any],
    text_keys: list[Iterable[str]],
    slots: tuple[TextSlot, ...],
) -> Converted:
    """Split an original-layout checkpoint into the diffusers state dicts.

    ``*_keys`` are the target models' own state-dict keys (a model built on the meta device
    gives them), so the result loads with ``strict=True`` when the checkpoint fits.
    """
    missing: list[str] = []

    def take(keys: Iterable[str], mapping: Mapping[str, str], prefix: str, *, vae: bool = False) -> StateDict:
        out: StateDict = {}
        for key in keys:
            source = prefix + mapping[key]
            if source not in checkpoint:
                missing.append(key)
                continue
            tensor = checkpoint[source]
            out[key] = tensor[:, :, 0, 0] if vae and _is_vae_attention_weight(mapping[key]) else tensor
        return out

    unet_keys = list(unet_keys)
    vae_keys = list(vae_keys)
    unet = take(unet_keys, unet_key_map(unet_keys, unet_config), UNET_PREFIX)
    vae = take(vae_keys, vae_key_map(vae_keys, vae_config), VAE_PREFIX, vae=True)
    used = {UNET_PREFIX + v for v in unet_key_map(unet_keys, unet_config).values()}
    used |= {VAE_PREFIX + v for v in vae_key_map(vae_keys, vae_config).values()}
    texts: list[StateDict] = []
    for keys, slot in zip(text_keys, slots, strict=True):
        text, slot_used = _text_from_original(checkpoint, _text_keys(keys), slot, missing)
        texts.append(text)
        used |= slot_used
    # What an OpenCLIP slot holds beyond the diffusers model (SD 2.x's unused last layer, its
    # projection; the logit scale) goes back into a re-export as it was.
    extras = {
        k: v
        for k, v in checkpoint.items()
        if k not in used and any(slot.layout == "open_clip" and k.startswith(slot.prefix) for slot in slots)
    }
    return Converted(unet=unet, vae=vae, texts=texts, extras=extras, missing=missing)
