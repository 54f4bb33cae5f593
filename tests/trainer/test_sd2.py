"""SD 2.x does what it says: the v-prediction objective and its SNR weighting, the native
resolution, a single file's prediction type read from what the file says (and a contradiction
refused), and the ``.yaml`` the web UIs read beside a v2 single file, checked with diffusers'
own readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer import original_config
from finetune_trainer.report import ProgressReporter
from finetune_trainer.train import DreamBoothRecipe
from tests.trainer.conftest import Run, base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

CONFIGS = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer" / "configs"
NAME = "tiny-v"


@pytest.fixture(scope="module")
def tiny_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v2") / "model", seed=0, model_type="v2x")


def v2_spec(model: Path, photos: Path, output: Path, **training: Any) -> dict[str, Any]:
    spec = base_spec(model, photos, output, **training)
    spec["baseModel"]["type"] = "v2x"
    return spec


@pytest.fixture(scope="module")
def v2_run(tiny_v2: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("v2-run")
    output = root / "out"
    run = run_cli(manifest(root / "job.yaml", name=NAME, **v2_spec(tiny_v2, photos, output)), output, root / "log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def test_the_v_prediction_target_and_its_snr_weighting(tiny_v2: Path, photos: Path, tmp_path: Path) -> None:
    """One micro-batch of the recipe against the textbook: the velocity of the very latents,
    noise and timesteps the step drew, weighted by min(SNR, gamma) / (SNR + 1)."""
    from diffusers.training_utils import compute_snr

    gamma = 5.0
    spec = v2_spec(tiny_v2, photos, tmp_path / "out", snrGamma=gamma, batchSize=4)
    spec["dataset"]["resolution"] = 64
    job = parse_manifest({"metadata": {"name": "v"}, "spec": spec})
    recipe = DreamBoothRecipe(job, reporter=ProgressReporter(job="v", enabled=False))
    seen: dict[str, Any] = {}
    try:
        recipe.setup()
        assert recipe.settings.prediction_type == "v_prediction"
        scheduler, unet = recipe.objective.scheduler, recipe.unet  # the family's DiffusionObjective
        add_noise = scheduler.add_noise

        def spy_add_noise(latents: Any, noise: Any, timesteps: Any) -> Any:
            seen.update(latents=latents.clone(), noise=noise.clone(), timesteps=timesteps.clone())
            return add_noise(latents, noise, timesteps)

        def spy_unet(*args: Any, **kwargs: Any) -> Any:
            out = unet(*args, **kwargs)
            seen["prediction"] = out.sample.detach().clone()
            return out

        scheduler.add_noise = spy_add_noise
        recipe.unet = spy_unet
        with torch.no_grad():
            loss = float(recipe.loss(0))
    finally:
        recipe.cleanup()

    latents, noise, timesteps = seen["latents"], seen["noise"], seen["timesteps"]
    alphas = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigmas = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    velocity = alphas * noise - sigmas * latents  # v = alpha_t * eps - sigma_t * x0
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    per_item = ((seen["prediction"].float() - velocity) ** 2).mean(dim=(1, 2, 3))
    expected = float((per_item * weights).mean())
    assert len(set(timesteps.tolist())) > 1
    assert loss == pytest.approx(expected, rel=1e-5)
    # Against the epsilon target the same prediction scores something else entirely.
    assert abs(float(((seen["prediction"] - noise) ** 2).mean()) - loss) > 1e-3


def test_v2x_trains_at_768_px_unless_told_otherwise() -> None:
    from finetune_trainer.job import Device, resolve_settings

    raw: dict[str, Any] = {
        "baseModel": {"uri": "/m", "type": "v2x"},
        "dataset": {"instanceImages": "/d", "instancePrompt": "a photo of nick"},
        "training": {"maxSteps": 1},
        "output": {"uri": "/o"},
    }
    settings, _ = resolve_settings(parse_manifest({"spec": raw}).spec, Device(type="cpu"))
    assert settings.resolution == 768
    raw["baseModel"]["type"] = "v2x-512"
    assert resolve_settings(parse_manifest({"spec": raw}).spec, Device(type="cpu"))[0].resolution == 512


def test_a_v2_single_file_gets_its_yaml_and_diffusers_reads_both(v2_run: Run, tiny_v2: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    single = v2_run.output / f"{NAME}.safetensors"
    config_file = single.with_suffix(".yaml")
    assert config_file.name in {f["path"] for f in v2_run.summary["files"]}
    config = yaml.safe_load(config_file.read_text())
    assert config["model"]["params"]["parameterization"] == "v"
    assert config["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    with safe_open(str(single), framework="pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"
        checkpoint = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118

    # diffusers' own reading of the YAML gives the exported UNet's architecture.
    ours = json.loads((v2_run.output / "diffusers" / "unet" / "config.json").read_text())
    theirs = create_unet_diffusers_config_from_ldm(config, checkpoint, image_size=64)
    for key, value in theirs.items():
        if key in ("sample_size",):
            continue
        mine = ours[key]
        assert (list(mine) if isinstance(mine, list | tuple) else mine) == (
            list(value) if isinstance(value, list | tuple) else value
        ), key

    # diffusers' from_single_file reads the v2 single file into the exported weights.
    loaded = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_v2), local_files_only=True)
    folder = StableDiffusionPipeline.from_pretrained(v2_run.output / "diffusers")
    for name in ("unet", "vae", "text_encoder"):
        mine_state, theirs_state = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        for key, value in mine_state.items():
            if "position_ids" in key:
                continue
            torch.testing.assert_close(theirs_state[key].float(), value.float(), rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("model_type", ["v1x", "v2x-512", "v2x"])
def test_the_yaml_of_the_real_architectures_is_the_published_config(model_type: str) -> None:
    folder = CONFIGS / model_type
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    prediction = "v_prediction" if model_type == "v2x" else "epsilon"
    written = original_config.original_config(
        unet=unet, vae=vae, v2=model_type != "v1x", prediction_type=prediction, scheduler=scheduler
    )
    published = yaml.safe_load((folder / "original_config.yaml").read_text())
    assert written == published


def test_a_single_files_prediction_type_is_read_from_what_it_says(v2_run: Run, photos: Path, tmp_path: Path) -> None:
    single = v2_run.output / f"{NAME}.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        embedded = json.loads(handle.metadata()["finetune.configs"])
    tokenizer = v2_run.output / "diffusers" / "tokenizer"
    # The tiny architecture, without a word on the prediction type.
    del embedded["model_type"], embedded["scheduler"]["prediction_type"]
    architecture = {"finetune.configs": json.dumps(embedded)}

    def base(name: str, *, metadata: dict[str, str] | None, yaml_text: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
        shutil.copytree(tokenizer, folder / "tokenizer")
        if yaml_text is not None:
            (folder / "model.yaml").write_text(yaml_text)
        return folder / "model.safetensors"

    def run(path: Path, model_type: str, name: str) -> Run:
        spec = base_spec(path, photos, tmp_path / f"out-{name}", maxSteps=1)
        spec["baseModel"]["type"] = model_type
        return run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), tmp_path, tmp_path / f"{name}-log")

    v_yaml = (v2_run.output / f"{NAME}.yaml").read_text()
    eps_config = yaml.safe_load(v_yaml)
    del eps_config["model"]["params"]["parameterization"]
    eps_yaml = yaml.safe_dump(eps_config)
    cases = [
        (
            "metadata",
            {**architecture, "modelspec.prediction_type": "v"},
            None,
            "its modelspec.prediction_type metadata",
        ),
        ("kohya", {**architecture, "ss_v_parameterization": "True"}, None, "its ss_v_parameterization metadata"),
        ("yaml", architecture, v_yaml, "model.yaml beside it"),
    ]
    for name, metadata, yaml_text, where in cases:
        path = base(name, metadata=metadata, yaml_text=yaml_text)
        refused = run(path, "v2x-512", f"{name}-512")
        assert refused.code == ExitCode.BAD_INPUT, name
        message = refused.summary["message"]
        assert message.startswith("spec.baseModel.type: "), message
        assert f"(as {where} says) was trained with v_prediction" in message
        assert "set spec.baseModel.type to v2x" in message
    # A YAML without parameterization means epsilon: v2x is the contradiction then.
    refused = run(base("eps", metadata=architecture, yaml_text=eps_yaml), "v2x", "eps-v")
    assert refused.code == ExitCode.BAD_INPUT
    assert "was trained with epsilon" in refused.summary["message"]
    # A file that says nothing trains as its declared type.
    silent = run(base("silent", metadata=architecture, yaml_text=None), "v2x", "silent-v")
    assert silent.code == ExitCode.SUCCESS, silent.summary
