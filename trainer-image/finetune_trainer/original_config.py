"""The original (latent-diffusion) config of a model: the ``.yaml`` the web UIs read beside a
single-file SD 2.x checkpoint, and what tells a single file's prediction type.

The AUTOMATIC1111 web UI and its forks take ``<name>.yaml`` beside ``<name>.safetensors`` as
the model's architecture; without it they assume SD 1.x's, and an SD 2.x v-prediction model
then loads as an epsilon one and draws noise.  The YAML is written from the exported model's
own configs, so it describes any size (the tests compare it with the published SD 2.x configs
shipped in ``configs/``, and read it back with diffusers' own converter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# The prediction type as the original configs and the model-spec metadata spell it.
PARAMETERIZATION = {"v_prediction": "v", "epsilon": "eps"}


def original_config(
    *, unet: dict[str, Any], vae: dict[str, Any], v2: bool, prediction_type: str, scheduler: dict[str, Any]
) -> dict[str, Any]:
    """The ``model:`` tree of an original config for a Stable Diffusion 1.x/2.x pipeline."""
    channels = list(unet["block_out_channels"])
    base = channels[0]
    down = list(unet["down_block_types"])
    # The downsampling factors at which the original UNet has attention, deepest first.
    attention = sorted((2**i for i, kind in enumerate(down) if kind.startswith("CrossAttn")), reverse=True)
    heads = unet["attention_head_dim"]
    unet_params: dict[str, Any] = {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": base,
        "attention_resolutions": attention,
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": [c // base for c in channels],
    }
    if v2:
        # diffusers' attention_head_dim is, for SD 2.x, the number of heads per block: the
        # original config states the channels per head instead.
        per_block = heads if isinstance(heads, list) else [heads] * len(channels)
        unet_params["num_head_channels"] = channels[0] // per_block[0]
        unet_params["use_linear_in_transformer"] = bool(unet.get("use_linear_projection"))
    else:
        unet_params["num_heads"] = heads if isinstance(heads, int) else heads[0]
    unet_params.update(
        {
            "use_spatial_transformer": True,
            "transformer_depth": unet.get("transformer_layers_per_block", 1) or 1,
            "context_dim": unet["cross_attention_dim"],
            "legacy": False,
        }
    )
    vae_channels = list(vae["block_out_channels"])
    params: dict[str, Any] = {}
    if prediction_type == "v_prediction":
        params["parameterization"] = "v"
    params.update(
        {
            "linear_start": scheduler.get("beta_start", 0.00085),
            "linear_end": scheduler.get("beta_end", 0.012),
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": scheduler.get("num_train_timesteps", 1000),
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": unet["sample_size"],
            "channels": unet["in_channels"],
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": vae.get("scaling_factor", 0.18215),
            "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": vae["latent_channels"],
                    "monitor": "val/rec_loss",
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": vae["latent_channels"],
                        "resolution": 256,
                        "in_channels": vae["in_channels"],
                        "out_ch": vae["out_channels"],
                        "ch": vae_channels[0],
                        "ch_mult": [c // vae_channels[0] for c in vae_channels],
                        "num_res_blocks": vae["layers_per_block"],
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": (
                {
                    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {"freeze": True, "layer": "penultimate"},
                }
                if v2
                else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
            ),
        }
    )
    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def prediction_type_of(config: Any) -> str | None:
    """``v_prediction`` or ``epsilon`` from an original config (absent parameterization: eps)."""
    try:
        params = config["model"]["params"]
    except (KeyError, TypeError):
        return None
    if not isinstance(params, dict):
        return None
    value = str(params.get("parameterization", "eps")).lower()
    return "v_prediction" if value == "v" else "epsilon" if value == "eps" else None


def read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
