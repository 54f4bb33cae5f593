"""Tiny Stable Diffusion, SDXL and Flux.1 pipelines with random weights, and a few synthetic
photos.

Tests and ``make demo`` train on these: the real code paths (diffusers folder, tokenizers,
VAE, UNet with cross-attention or Flux's transformer, scheduler) at a size where a few dozen
steps at 32-64 px take seconds on a CPU.  Nothing is downloaded: the tokenizers' vocabularies
(CLIP's byte-pair merges, T5's unigram pieces) are made here, the weights come from a seeded
random init.
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
    from diffusers import PNDMScheduler, UNet2DConditionModel
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
    vae = _tiny_vae(scaling_factor=0.18215)
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
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
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
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
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


def tiny_t5_tokenizer(*, max_length: int = 32) -> Any:
    """A T5 tokenizer of the tiny vocabulary: a unigram model (as T5's SentencePiece one is) with
    a piece for each of ``_WORDS`` and for every letter, so any prompt tokenizes; pad 0, end of
    text 1, unknown 2, as T5's.  ``max_length`` stands in for Flux's 512 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    pieces += [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    # transformers 5's T5Tokenizer is the fast (tokenizers-backed) one.
    return T5Tokenizer(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def build_tiny_flux_pipeline(dest: Path, *, seed: int = 0, schnell: bool = False) -> Path:
    """Write a tiny diffusers FluxPipeline folder to ``dest`` and return it.

    Flux.1's shapes in small: a CLIP text encoder whose pooled output and a T5 encoder whose
    hidden states condition the transformer, a transformer with double-stream and single-stream
    blocks, rotary position axes and (dev) the guidance embedding, a 16-channel VAE with Flux's
    shift and scale factors and no quant convs, and the flow-matching scheduler (dev: shifted by
    resolution; ``schnell``: no guidance embedding, no shift).
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab, _ = tiny_vocabulary()
    t5_tokenizer = tiny_t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2 x 2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),  # adding up to the head width, as Flux.1's (16, 56, 56) to 128
    )
    # Flux.1's VAE: 16 latent channels, four blocks, a shift, no quant convolutions.
    vae = _tiny_vae(
        blocks=(16, 16, 32, 32),
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    if schnell:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    pipeline: Any = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=_tiny_tokenizer(dest),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest, safe_serialization=True)
    return dest


def write_flux_single_file(folder: Path, dest: Path, *, prefix: str = "") -> Path:
    """The transformer of a diffusers Flux folder as one ``.safetensors`` in the original (Black
    Forest Labs) layout, as ``flux1-dev.safetensors`` is (``prefix``: ComfyUI's
    ``model.diffusion_model.``)."""
    from safetensors.torch import load_file, save_file

    from finetune_trainer import flux_layout

    state: dict[str, Any] = {}
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(str(shard)))
    original = {prefix + k: v.contiguous() for k, v in flux_layout.to_original(state).items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(original, str(dest))
    return dest


def _tiny_vae(
    *, scaling_factor: float, blocks: tuple[int, ...] = (16, 32, 32), latent_channels: int = 4, **family: Any
) -> Any:
    """The tiny VAE every tiny pipeline uses (64 px, one layer a block), with its family's
    scaling factor, latent channels and whatever else sets the family apart (``family``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **family,
    )


def _save_pipeline(dest: Path, **components: Any) -> Path:
    """Save a Stable Diffusion pipeline of these components (no safety checker) under ``dest``."""
    from diffusers import StableDiffusionPipeline

    pipeline: Any = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_clip(dest: Path, *, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel with its processor (the tiny tokenizer, 32 px images), for
    spec.evaluation's clipModel in tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vocab, _ = tiny_vocabulary()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": vocab[BOS],
            "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(dest)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=_tiny_tokenizer(dest, folder=".")).save_pretrained(dest)
    return dest


def build_tiny_dino(dest: Path, *, seed: int = 0) -> Path:
    """A tiny ViT (DINO's architecture, random weights) with its image processor, for
    spec.evaluation's dinoModel in tests."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    ViTModel(config).save_pretrained(dest)  # with the pooler AutoModel expects (unused: the CLS token is scored)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dest)
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


def build_random_pipeline(dest: Path, *, model_type: str = "v1x", seed: int = 0, shallow: bool = False) -> Path:
    """A full-size pipeline with random weights, from the architecture configs this package
    ships (``configs/<type>/``): SD 1.5's exact shapes for ``v1x``, with nothing downloaded.
    Its tokenizer is the tiny one (the real vocabulary is not shipped), which changes no
    shape: prompts are padded to 77 tokens either way.  For benchmarks: about 4 GB in fp32
    (``sdxl``: about 14 GB; ``flux1``: about 34 GB in bf16, see ``_random_flux``).

    ``shallow`` (``sdxl`` and ``flux1``, for ``make gpu-check``): the same widths with the depth
    cut, every kind of layer still there: SDXL's UNet one layer per block and at most two
    transformer layers per attention block, six layers per text encoder; Flux.1's transformer
    two double- and four single-stream blocks, T5 four layers."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = Path(__file__).parent / "configs" / model_type
    torch.manual_seed(seed)
    if model_type == "flux1":
        return _random_flux(dest, configs, shallow=shallow)
    if model_type == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        unet_config = dict(UNet2DConditionModel.load_config(configs / "unet"))
        texts = [CLIPTextConfig.from_json_file(configs / p / "config.json") for p in ("text_encoder", "text_encoder_2")]
        if shallow:
            unet_config["layers_per_block"] = 1
            unet_config["transformer_layers_per_block"] = [
                min(2, n) for n in unet_config["transformer_layers_per_block"]
            ]
            for text in texts:
                text.num_hidden_layers = 6
        device = "cuda" if shallow and torch.cuda.is_available() else "cpu"
        with torch.device(device):
            pipeline: Any = StableDiffusionXLPipeline(
                vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
                text_encoder=CLIPTextModel(texts[0]),
                text_encoder_2=CLIPTextModelWithProjection(texts[1]),
                tokenizer=_tiny_tokenizer(dest),
                tokenizer_2=_tiny_tokenizer(dest, folder="tokenizer_2"),
                unet=UNet2DConditionModel.from_config(unet_config),
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


def _random_flux(dest: Path, configs: Path, *, shallow: bool = False) -> Path:
    """Flux.1-dev's architecture with random weights, in bf16 (as the released weights are: 24 GB
    for the transformer, 9.5 GB for T5-XXL; fp32 would not fit most hosts), built on the GPU where
    there is one (initialising 16 B parameters on a CPU takes minutes).  The tokenizers are the
    tiny ones, T5's with Flux's 512-token window."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            config = dict(FluxTransformer2DModel.load_config(configs / "transformer"))
            t5_config = T5Config.from_json_file(configs / "text_encoder_2" / "config.json")
            if shallow:
                config.update(num_layers=2, num_single_layers=4)
                t5_config.num_layers = 4
            transformer = FluxTransformer2DModel.from_config(config)
            t5 = T5EncoderModel(t5_config)
            clip = CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json"))
    finally:
        torch.set_default_dtype(previous)
    pipeline: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            FlowMatchEulerDiscreteScheduler.load_config(configs / "scheduler")
        ),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=clip,
        tokenizer=_tiny_tokenizer(dest),
        text_encoder_2=t5,
        tokenizer_2=tiny_t5_tokenizer(max_length=512),
        transformer=transformer,
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(dest, safe_serialization=True)
    del pipeline, transformer, t5
    if device == "cuda":
        torch.cuda.empty_cache()
    return dest


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
