"""Flux.1's original key layout (Black Forest Labs' ``flux1-dev.safetensors``, what ComfyUI and
kohya's scripts name modules by) and diffusers' ``FluxTransformer2DModel``, both ways.

The two differ in more than names: the original fuses the image stream's q, k and v into one
``img_attn.qkv`` linear (and the text stream's into ``txt_attn.qkv``), and a single block's q,
k, v and MLP input into one ``linear1``; diffusers keeps them apart.  Its final modulation
holds (shift, scale) where diffusers' holds (scale, shift).  One table (``modules``) says which
diffusers modules make up each original one, in output-row order; the state-dict converters
and the kohya LoRA file's names (``lora.py``) read it.

Any size converts: the fused rows split by the transformer's width (read from ``img_in``),
not by Flux.1's 3072, so a tiny test model converts as Flux.1 does.  A test checks this
table against diffusers' own single-file converter at Flux.1's real widths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# ComfyUI and some merges save the transformer under this prefix.
COMFY_PREFIX = "model.diffusion_model."
# Keys every original-layout Flux transformer has.
MARKERS = ("double_blocks.0.img_attn.qkv.weight", "img_in.weight", "txt_in.weight")


@dataclass(frozen=True)
class Module:
    """One module of the original layout and the diffusers modules it is made of, in the order
    their output rows are stacked."""

    original: str
    parts: tuple[str, ...]
    # An RMSNorm: its parameter is ``scale`` in the original, ``weight`` in diffusers.
    norm: bool = False
    # The final layer's modulation: (shift, scale) in the original, (scale, shift) in diffusers.
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def modules(num_double: int, num_single: int, *, guidance: bool) -> list[Module]:
    """Every module of a Flux transformer with this many double-stream and single-stream blocks."""
    table = [
        Module("img_in", ("x_embedder",)),
        Module("txt_in", ("context_embedder",)),
        Module("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Module("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Module("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Module("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        Module("final_layer.linear", ("proj_out",)),
        Module("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    if guidance:
        table += [
            Module("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            Module("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    for i in range(num_double):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table += [
            Module(f"{o}.img_mod.lin", (f"{d}.norm1.linear",)),
            Module(f"{o}.txt_mod.lin", (f"{d}.norm1_context.linear",)),
            Module(f"{o}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
            Module(f"{o}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")),
            Module(f"{o}.img_attn.norm.query_norm", (f"{d}.attn.norm_q",), norm=True),
            Module(f"{o}.img_attn.norm.key_norm", (f"{d}.attn.norm_k",), norm=True),
            Module(f"{o}.txt_attn.norm.query_norm", (f"{d}.attn.norm_added_q",), norm=True),
            Module(f"{o}.txt_attn.norm.key_norm", (f"{d}.attn.norm_added_k",), norm=True),
            Module(f"{o}.img_attn.proj", (f"{d}.attn.to_out.0",)),
            Module(f"{o}.txt_attn.proj", (f"{d}.attn.to_add_out",)),
            Module(f"{o}.img_mlp.0", (f"{d}.ff.net.0.proj",)),
            Module(f"{o}.img_mlp.2", (f"{d}.ff.net.2",)),
            Module(f"{o}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",)),
            Module(f"{o}.txt_mlp.2", (f"{d}.ff_context.net.2",)),
        ]
    for i in range(num_single):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table += [
            Module(f"{o}.modulation.lin", (f"{d}.norm.linear",)),
            Module(f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")),
            Module(f"{o}.norm.query_norm", (f"{d}.attn.norm_q",), norm=True),
            Module(f"{o}.norm.key_norm", (f"{d}.attn.norm_k",), norm=True),
            Module(f"{o}.linear2", (f"{d}.proj_out",)),
        ]
    return table


def block_counts(keys: list[str] | set[str], *, original: bool) -> tuple[int, int]:
    """(double-stream blocks, single-stream blocks) of a state dict in either layout."""
    double, single = (
        (r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\.")
        if original
        else (
            r"^transformer_blocks\.(\d+)\.",
            r"^single_transformer_blocks\.(\d+)\.",
        )
    )
    counts = []
    for pattern in (double, single):
        found = {int(m[1]) for k in keys if (m := re.search(pattern, k))}
        counts.append(max(found) + 1 if found else 0)
    return counts[0], counts[1]


def is_original(keys: list[str] | set[str]) -> bool:
    names = {k.removeprefix(COMFY_PREFIX) for k in keys}
    return all(m in names for m in MARKERS)


def has_guidance(keys: list[str] | set[str]) -> bool:
    """FLUX.1-dev has the guidance embedding (a distilled guidance scale); schnell has none."""
    return any(k.removeprefix(COMFY_PREFIX).startswith("guidance_in.") for k in keys)


def _params(module: Module) -> list[tuple[str, str]]:
    """(original parameter, diffusers parameter) names of one module."""
    if module.norm:
        return [("scale", "weight")]
    return [("weight", "weight"), ("bias", "bias")]


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def from_original(checkpoint: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """An original-layout transformer's state dict in diffusers' names: (state dict, original
    keys that were missing, original keys left over)."""
    state = {k.removeprefix(COMFY_PREFIX): v for k, v in checkpoint.items()}
    num_double, num_single = block_counts(set(state), original=True)
    width = int(state["img_in.weight"].shape[0])
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for module in modules(num_double, num_single, guidance=has_guidance(set(state))):
        for original, converted in _params(module):
            key = f"{module.original}.{original}"
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            tensor = state[key]
            if module.swap_halves:
                tensor = _swap(tensor)
            if module.fused:
                # q, k and v are each as wide as the transformer; a single block's MLP input
                # takes the rest.
                sizes = [width] * (len(module.parts) - 1)
                sizes.append(int(tensor.shape[0]) - sum(sizes))
                for part, piece in zip(module.parts, tensor.split(sizes, dim=0), strict=True):
                    out[f"{part}.{converted}"] = piece.contiguous()
            else:
                out[f"{module.parts[0]}.{converted}"] = tensor
    leftover = sorted(set(state) - used)
    return out, missing, leftover


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in the original layout."""
    import torch

    num_double, num_single = block_counts(set(state), original=False)
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in state)
    out: dict[str, torch.Tensor] = {}
    for module in modules(num_double, num_single, guidance=guidance):
        for original, converted in _params(module):
            tensor = torch.cat([state[f"{part}.{converted}"] for part in module.parts], dim=0)
            out[f"{module.original}.{original}"] = _swap(tensor) if module.swap_halves else tensor
    return out


def original_modules(num_double: int, num_single: int, *, guidance: bool) -> dict[str, tuple[str, int, int]]:
    """Each diffusers module -> (the original module it is part of, its index there, how many
    parts that module has)."""
    found: dict[str, tuple[str, int, int]] = {}
    for module in modules(num_double, num_single, guidance=guidance):
        for index, part in enumerate(module.parts):
            found[part] = (module.original, index, len(module.parts))
    return found
