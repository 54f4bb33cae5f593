"""A tiny Stable Diffusion pipeline with random weights, and a few synthetic photos.

Tests and ``make demo`` train on these: the real code paths (diffusers folder, tokenizer,
VAE, UNet with cross-attention, scheduler) at a size where a few dozen steps at 32-64 px
take seconds on a CPU.  Nothing is downloaded: the tokenizer's vocabulary and merges are
made here, the weights come from a seeded random init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Words whose byte-pair merges are in the tiny vocabulary; anything else still tokenizes,
# one byte-level symbol at a time.
_WORDS = ("a", "photo", "of", "sks", "dog", "cat", "toy", "man", "person", "on", "the", "beach", "red", "ball")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """A printable symbol for every byte, the byte-level BPE convention CLIP's tokenizer uses:
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def tiny_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) for a CLIP tokenizer: every byte symbol, with and without the
    end-of-word marker, the merges that spell ``_WORDS``, and the two special tokens."""
    symbols = _byte_symbols()
    tokens: list[str] = [*symbols, *(s + "</w>" for s in symbols)]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = (parts[0], parts[1])
            joined = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(joined)
            parts = [joined, *parts[2:]]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_tiny_pipeline(
    dest: Path, *, seed: int = 0, prediction_type: str | None = None, model_type: str = "v1x"
) -> Path:
    """Write a tiny diffusers StableDiffusionPipeline folder to ``dest`` and return it.

    Shapes follow SD 1.x (a CLIP text encoder, cross-attention in all but the deepest UNet
    block, a 4-channel latent VAE) with two or three blocks each, so layout conversions meet the same
    structure as on a real model, only smaller.  ``model_type`` v2x-512 or v2x gives it SD 2.x's
    traits: linear projections in the transformer blocks, heads of equal width, a GELU text
    encoder, and for v2x v-prediction.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    v2 = model_type != "v1x"
    if prediction_type is None:
        prediction_type = "v_prediction" if model_type == "v2x" else "epsilon"
    torch.manual_seed(seed)
    vocab, _ = tiny_vocabulary()
    tokenizer = _tiny_tokenizer(dest)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu" if v2 else "quick_gelu",
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # SD 2.x counts heads per block (of 64 channels each there, of 8 here).
        attention_head_dim=(4, 8) if v2 else 4,
        use_linear_projection=v2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return _save_pipeline(dest, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_tiny_sdxl_pipeline(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny diffusers StableDiffusionXLPipeline folder to ``dest`` and return it.

    SDXL's shapes in small: two text encoders (a CLIP one and one with a projection, whose
    pooled output and both penultimate layers condition the UNet), a UNet with the size-and-
    crop embedding (``text_time``), blocks whose first has no attention and whose second has
    two transformer layers (as SDXL's 2 and 10), heads of equal width, and the SDXL VAE's
    scaling factor.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab, _ = tiny_vocabulary()

    # The two encoders differ in width, as SDXL's (768 and 1280) do: loaders tell them apart by it.
    def text_config(act: str, width: int) -> Any:
        return CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=width,
            hidden_act=act,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )

    tokenizer = _tiny_tokenizer(dest)
    tokenizer_2 = _tiny_tokenizer(dest, folder="tokenizer_2")
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,  # both encoders' hidden states, side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,  # the second's pooled projection + six time ids
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipeline: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config("quick_gelu", 32)),
        text_encoder_2=CLIPTextModelWithProjection(text_config("gelu", 48)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest, safe_serialization=True)
    return dest


def _save_pipeline(dest: Path, **components: Any) -> Path:
    """Save a Stable Diffusion pipeline of these components (no safety checker) under ``dest``."""
    from diffusers import StableDiffusionPipeline

    pipeline: Any = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest, safe_serialization=True)
    return dest


def _tiny_tokenizer(dest: Path, *, folder: str = "tokenizer") -> Any:
    """A CLIP tokenizer of the tiny vocabulary, its files written under ``dest/<folder>``."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocabulary()
    # The two files a CLIP tokenizer is made of, written out as any version of transformers
    # reads them; save_pretrained adds its own fast-tokenizer file beside them.
    tokenizer_dir = dest / folder
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def build_random_pipeline(dest: Path, *, model_type: str = "v1x", seed: int = 0) -> Path:
    """A full-size pipeline with random weights, from the architecture configs this package
    ships (``configs/<type>/``): SD 1.5's exact shapes for ``v1x``, with nothing downloaded.
    Its tokenizer is the tiny one (the real vocabulary is not shipped), which changes no
    shape: prompts are padded to 77 tokens either way.  For benchmarks: about 4 GB in fp32
    (``sdxl``: about 14 GB)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = Path(__file__).parent / "configs" / model_type
    torch.manual_seed(seed)
    if model_type == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        pipeline: Any = StableDiffusionXLPipeline(
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json")),
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(configs / "text_encoder_2" / "config.json")
            ),
            tokenizer=_tiny_tokenizer(dest),
            tokenizer_2=_tiny_tokenizer(dest, folder="tokenizer_2"),
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
            scheduler=EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(configs / "scheduler")),
            add_watermarker=False,
        )
        dest.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(dest, safe_serialization=True)
        return dest
    return _save_pipeline(
        dest,
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json")),
        tokenizer=_tiny_tokenizer(dest),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(configs / "scheduler")),
    )


def write_demo_images(dest: Path, count: int, size: int, *, seed: int = 0) -> list[Path]:
    """A few photos of one simple subject (a red ball on a two-tone background), each a little
    different in place and size, alternating PNG and JPEG as a user's folder would."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(count):
        image = Image.new("RGB", (size, size), (70, 130, 180))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size * 2 // 3, size, size), fill=(194, 178, 128))
        radius = size * rng.uniform(0.18, 0.26)
        cx = size * rng.uniform(0.35, 0.65)
        cy = size * rng.uniform(0.35, 0.6)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(200, 30, 30))
        # A highlight, so that the subject has some structure worth learning.
        hr = radius / 3
        hx, hy = cx - radius / 2.5, cy - radius / 2.5
        draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=(250, 200, 200))
        suffix = ".png" if index % 2 == 0 else ".jpg"
        path = dest / f"subject-{index:02d}{suffix}"
        image.save(path, quality=95) if suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths
