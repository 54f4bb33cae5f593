"""The single-file converter: exact round trips, agreement with diffusers' own loader, and
the shipped configs against the real Stable Diffusion architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune_trainer import convert
from finetune_trainer.model import CONFIGS

pytestmark = pytest.mark.trainer


SLOTS = {"clip": convert.SD1_TEXT, "open_clip": convert.SD2_TEXT}


def _components(folder: Path, layout: convert.TextLayout = "clip") -> tuple[convert.Components, object]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    components = convert.Components(
        unet=pipe.unet.state_dict(),
        vae=pipe.vae.state_dict(),
        texts=[pipe.text_encoder.state_dict()],
        unet_config=pipe.unet.config,
        vae_config=pipe.vae.config,
        slots=SLOTS[layout],
    )
    return components, pipe


def _back(original: dict[str, torch.Tensor], c: convert.Components) -> convert.Converted:
    return convert.from_original(
        original,
        unet_keys=c.unet,
        unet_config=c.unet_config,
        vae_keys=c.vae,
        vae_config=c.vae_config,
        text_keys=list(c.texts),
        slots=c.slots,
    )


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_round_trip_is_exact(tiny_model: Path, layout: convert.TextLayout) -> None:
    components, _ = _components(tiny_model, layout)
    original = convert.to_original(components)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in original)
    assert convert.detect_text_slots(original) == SLOTS[layout]
    back = _back(original, components)
    assert back.missing == []
    for ours, theirs in ((components.unet, back.unet), (components.vae, back.vae)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = {k: v for k, v in components.texts[0].items() if "position_ids" not in k}
    assert text.keys() == back.texts[0].keys()
    assert all(torch.equal(text[k], back.texts[0][k]) for k in text)


def test_diffusers_single_file_loader_reads_our_layout(tiny_model: Path, tmp_path: Path) -> None:
    """diffusers' own from_single_file, given the architecture, yields our exact weights: the
    layout is the one the ecosystem reads, not just one we can read back."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    components, _ = _components(tiny_model)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in convert.to_original(components).items()}, str(path))
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_model), local_files_only=True)
    for ours, module in (
        (components.unet, loaded.unet),
        (components.vae, loaded.vae),
        (components.texts[0], loaded.text_encoder),
    ):
        theirs = module.state_dict()
        compared = [k for k in ours if "position_ids" not in k]
        assert set(compared) <= set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in compared)


# diffusers deprecates the image size it still needs to tell SD 2.x at 512 from 768 px.
@pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("model_type", "text_keys", "cross_width", "diffusers_type"),
    [("v1x", 197, 768, "v1"), ("v2x-512", 280, 1024, "v2"), ("v2x", 280, 1024, "v2")],
)
def test_shipped_configs_are_the_real_architectures(
    model_type: str, text_keys: int, cross_width: int, diffusers_type: str
) -> None:
    """Built on the meta device (no memory), converted to the original layout: the key counts
    and parameter count of released SD checkpoints, and diffusers' own model-type detection."""
    import yaml
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIGS / model_type
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    slots = convert.SD1_TEXT if model_type == "v1x" else convert.SD2_TEXT
    original = convert.to_original(
        convert.Components(unet.state_dict(), vae.state_dict(), [text.state_dict()], unet.config, vae.config, slots)
    )

    def count(prefix: str) -> int:
        return sum(k.startswith(prefix) for k in original)

    assert count("model.diffusion_model.") == 686
    assert count("first_stage_model.") == 248
    assert count("cond_stage_model.") == text_keys
    unet_params = sum(v.numel() for k, v in original.items() if k.startswith("model.diffusion_model."))
    assert round(unet_params / 1e6, 1) == (859.5 if model_type == "v1x" else 865.9)
    attn2 = original["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    assert attn2.shape == (320, cross_width)
    assert infer_diffusers_model_type(original) == diffusers_type
    # The original-layout YAML shipped beside them describes the same UNet.
    original_config = yaml.safe_load((folder / "original_config.yaml").read_text())
    image_size = 768 if model_type == "v2x" else 512
    from_yaml = create_unet_diffusers_config_from_ldm(original_config, original, image_size=image_size)
    for key, value in from_yaml.items():
        ours = unet.config[key]
        assert (list(ours) if isinstance(ours, tuple) else ours) == (
            list(value) if isinstance(value, tuple) else value
        ), key
