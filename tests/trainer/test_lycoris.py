"""LoRA's other kinds (``spec.training.lora.type``: locon, loha, lokr, dora), trained on the tiny model:
each trains, resumes after a kill to the very adapters of an uninterrupted run, exports the
kohya-layout file and a folder, and each export loads with a loader that is not ours (the
LyCORIS package's for the kohya file; diffusers' ``load_lora_weights`` or peft's
``PeftModel.from_pretrained`` for the folder) to the model the run trained and merged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import Run, base_spec, killed_and_resumed, manifest, run_cli

STEPS, EVERY = 4, 2
RANK, ALPHA = 4, 2.0  # alpha != rank: a loader that ignored alpha would be off by a factor of 2
KINDS = ("locon", "loha", "lokr", "dora")
# What the kohya-layout file holds for each kind, beside .alpha (LyCORIS' names).
KOHYA_SUFFIXES = {
    "locon": {"lora_down.weight", "lora_up.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    # Both factors whole, where peft trains w2 low-rank too (the UNet's feed-forward, whose w2 is
    # 16 x 8 and wider, under rank 4): the way every reader scales alike.
    "lokr": {"lokr_w1", "lokr_w2"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
}


def kind_spec(kind: str, model: Path, photos: Path, output: Path, *, merge: bool = True) -> dict[str, Any]:
    # The learning rate is high so that a few steps move every factor far from where it started.
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=2, learningRate=3.0e-2, seed=7)
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"type": kind, "rank": RANK, "alpha": ALPHA, "trainTextEncoder": True}
    if kind in ("locon", "dora"):
        spec["training"]["lora"]["dropout"] = 0.1  # LoRA's dropout: resumed, it draws the same
    spec["checkpoints"] = {"everySteps": EVERY, "keepLast": 2}
    spec["output"]["mergeLoRA"] = merge
    return spec


@pytest.fixture(scope="module", params=KINDS)
def kind_run(
    request: pytest.FixtureRequest, tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Run]:
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    output = root / "out"
    job = manifest(root / "job.yaml", name=f"tiny-{kind}", **kind_spec(kind, tiny_model, photos, output))
    run = run_cli(job, output, root / "termination-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return kind, run


# --- what a loader sees --------------------------------------------------------------------------


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = torch.randint(0, 60, (2, 77), generator=generator)
    return latents, torch.tensor([10, 700]), ids


@torch.no_grad()
def _outputs(unet: Any, text_encoder: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's hidden states and the UNet's prediction from them: what an adapter on
    either changes."""
    latents, timesteps, ids = _inputs()
    hidden = text_encoder(ids)[0]
    return hidden, unet(latents, timesteps, encoder_hidden_states=hidden).sample


def _base(model: Path) -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    return unet, text_encoder


class _Named(torch.nn.Module):
    """The text encoder under ``text_model.``, as every LoRA file names its modules (transformers
    5.6 dropped that level; LyCORIS matches the file's names against the module's)."""

    def __init__(self, text_encoder: Any) -> None:
        super().__init__()
        self.text_model = text_encoder


def _lycoris_apply(path: Path, unet: Any, text_encoder: Any) -> int:
    """The kohya-layout file through the LyCORIS package's own loader (``create_lycoris_from_weights``
    builds each module's kind from the file's names and shapes, with its own scale), applied to
    the models as LyCORIS runs them.  Returns how many modules it built.

    LyCORIS 4.1.3's kohya entry point (``lycoris.kohya.create_network_from_weights``) refuses a
    diffusers SD UNet outright (its preset adds time_embedding twice), so the generic loader gets
    the file with the kohya prefixes swapped for its own; and LyCORIS' merge of a LoHa scales it
    twice (``LohaModule.get_diff_weight``), so the modules run as LyCORIS trains them (apply_to),
    which is the arithmetic the web UIs use."""
    from lycoris import create_lycoris_from_weights

    weights = load_file(str(path))
    built = 0
    for prefix, module in (("lora_unet_", unet), ("lora_te_", _Named(text_encoder))):
        mine = {"lycoris_" + k.removeprefix(prefix): v.float() for k, v in weights.items() if k.startswith(prefix)}
        network, _ = create_lycoris_from_weights(1.0, None, module, weights_sd=mine)
        network.apply_to()
        built += len(network.loras)
    return built


# --- the tests -----------------------------------------------------------------------------------


def test_each_kind_trains_and_its_files_carry_lycoris_names(kind_run: tuple[str, Run]) -> None:
    kind, run = kind_run
    out = run.output
    name = f"tiny-{kind}"
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert f"{name}-lora.safetensors" in listed
    folder = (
        {"lora/pytorch_lora_weights.safetensors"}
        if kind in ("locon", "dora")
        else {
            f"lora/{part}/{f}"
            for part in ("unet", "text_encoder")
            for f in ("adapter_config.json", "adapter_model.safetensors")
        }
    )
    assert folder <= listed
    with safe_open(str(out / f"{name}-lora.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    modules: dict[str, set[str]] = {}
    for key in keys:
        module, _, suffix = key.partition(".")
        modules.setdefault(module, set()).add(suffix)
    # kohya's targets: 4 transformer blocks x 12 layers in the UNet, 2 x 6 in the text encoder;
    # LoCon adds the tiny UNet's 8 ResNet blocks (conv1, conv2, time_emb_proj; 5 with a 1x1
    # shortcut), a downsampler and an upsampler: 31 more.
    assert sum(m.startswith("lora_unet_") for m in modules) == 48 + (31 if kind == "locon" else 0)
    if kind == "locon":
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in modules
    assert sum(m.startswith("lora_te_text_model_") for m in modules) == 12
    for module, suffixes in modules.items():
        assert suffixes == KOHYA_SUFFIXES[kind] | {"alpha"}, module
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == ("lora" if kind == "dora" else kind)
    if kind == "locon":  # a 3x3 convolution's down is 3x3, its up 1x1, as LyCORIS and kohya write them
        with safe_open(str(out / f"{name}-lora.safetensors"), framework="pt") as handle:
            assert tuple(handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape[2:]) == (
                3,
                3,
            )
            assert tuple(handle.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").shape[2:]) == (
                1,
                1,
            )
    # The model card says what was trained and how each file loads.
    card = (out / "README.md").read_text()
    assert (
        f"| {dict(locon='LoCon', loha='LoHa', lokr='LoKr', dora='DoRA')[kind]} | rank {RANK}, alpha {ALPHA:g}" in card
    )
    if kind == "locon":
        assert f'pipe.load_lora_weights("{name}-lora.safetensors")' in card
    elif kind == "dora":
        assert 'pipe.load_lora_weights("lora")' in card
        assert f'load_lora_weights("{name}-lora.safetensors")' not in card  # diffusers drops its dora_scale
    else:
        assert 'pipe.unet = PeftModel.from_pretrained(pipe.unet, "lora/unet")' in card
        assert 'pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, "lora/text_encoder")' in card
    # Checkpoints hold the adapters in peft's names, nothing of the base model.
    checkpoint = load_file(str(out / "checkpoints" / f"checkpoint-{STEPS:06d}" / "model.safetensors"))
    marker = {"locon": ".lora_", "loha": ".hada_", "lokr": ".lokr_", "dora": ".lora_"}[kind]
    assert checkpoint
    assert all(marker in k for k in checkpoint)
    if kind == "lokr":  # what the file's whole w2 was made from: peft's low-rank w2 where it chose one
        assert sum(k.endswith(".lokr_w2_a") for k in checkpoint) == 4 * 2  # each block's ff.net.0.proj, ff.net.2
    if kind == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in checkpoint)


def test_the_kohya_file_loads_in_lycoris_to_the_merged_model(kind_run: tuple[str, Run], tiny_model: Path) -> None:
    """The run's merged model (mergeLoRA: base + peft's delta, folded into the weights) against the
    base with the kohya-layout file applied by LyCORIS: the same text-encoder states and UNet
    prediction, and both differ from the base's."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    kind, run = kind_run
    merged = _outputs(
        UNet2DConditionModel.from_pretrained(run.output / "diffusers" / "unet").eval(),
        CLIPTextModel.from_pretrained(run.output / "diffusers" / "text_encoder").eval(),
    )
    base = _outputs(*_base(tiny_model))
    unet, text_encoder = _base(tiny_model)
    assert _lycoris_apply(run.output / f"tiny-{kind}-lora.safetensors", unet, text_encoder) == 60 + (
        31 if kind == "locon" else 0
    )
    theirs = _outputs(unet, text_encoder)
    for part, (ours, loaded, before) in enumerate(zip(merged, theirs, base, strict=True)):
        assert (ours - before).abs().max() > 1e-3, f"{kind}: the adapters changed nothing in part {part}"
        torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-4, msg=f"{kind}, part {part}")


def test_the_folder_loads_with_diffusers_or_peft_to_the_merged_model(
    kind_run: tuple[str, Run], tiny_model: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    kind, run = kind_run
    merged = StableDiffusionPipeline.from_pretrained(run.output / "diffusers", dtype=torch.float32)
    expected = _outputs(merged.unet.eval(), merged.text_encoder.eval())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    if kind in ("locon", "dora"):
        pipe.load_lora_weights(run.output / "lora")
        unet, text_encoder = pipe.unet, pipe.text_encoder
    else:
        from peft import PeftModel

        unet = PeftModel.from_pretrained(pipe.unet, run.output / "lora" / "unet")
        text_encoder = PeftModel.from_pretrained(pipe.text_encoder, run.output / "lora" / "text_encoder")
    got = _outputs(unet.eval(), text_encoder.eval())
    for part, (loaded, ours) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-4, msg=f"{kind}, part {part}")
    if kind == "locon":  # the kohya file too, through diffusers' converter (its model card says so)
        kohya = StableDiffusionPipeline.from_pretrained(tiny_model, dtype=torch.float32)
        kohya.load_lora_weights(str(run.output / f"tiny-{kind}-lora.safetensors"))
        got = _outputs(kohya.unet.eval(), kohya.text_encoder.eval())
        for part, (loaded, ours) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-4, msg=f"{kind} kohya file, part {part}")


def test_a_killed_run_of_each_kind_resumes_to_the_same_adapters(
    kind_run: tuple[str, Run], tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    kind, run = kind_run
    output = tmp_path / "out"
    job = manifest(
        tmp_path / "job.yaml", name=f"tiny-{kind}", **kind_spec(kind, tiny_model, photos, output, merge=False)
    )
    killed_and_resumed(job, output, tmp_path, kill_at=STEPS, resume_from=EVERY)
    for part in ("model.safetensors", "model_1.safetensors"):
        ours = load_file(str(output / "checkpoints" / f"checkpoint-{STEPS:06d}" / part))
        theirs = load_file(str(run.output / "checkpoints" / f"checkpoint-{STEPS:06d}" / part))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=f"{kind} {part}: {key}")
    name = f"tiny-{kind}-lora.safetensors"
    ours, theirs = load_file(str(output / name)), load_file(str(run.output / name))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.parametrize("kind", KINDS)
def test_sdxl_kinds_name_the_modules_a_lora_names(kind: str, tmp_path: Path) -> None:
    """On SDXL the kohya layout names the UNet's modules as kohya's SDXL scripts do
    (``lora_unet_input_blocks_*``) and the text encoders ``lora_te1_``/``lora_te2_``: each kind's
    file names the very layers a LoRA's does, with its own weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from finetune_api.v1alpha1 import LoRASettings
    from finetune_trainer import lora
    from finetune_trainer.families import family_of
    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    folder = build_tiny_sdxl_pipeline(tmp_path / "xl")
    family = family_of("sdxl")

    def layers(settings: LoRASettings) -> dict[str, set[str]]:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        encoders = [
            CLIPTextModel.from_pretrained(folder / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        ]
        lora.add_adapters(unet, encoders, settings, family=family)
        tensors = lora.kohya_state_dict(
            family, unet, encoders, alpha=settings.alpha, dtype=torch.float16, kind=settings.type, rank=settings.rank
        )
        out: dict[str, set[str]] = {}
        for key in tensors:
            module, _, suffix = key.partition(".")
            out.setdefault(module, set()).add(suffix)
        return out

    plain = layers(LoRASettings(rank=RANK, alpha=ALPHA, train_text_encoder=True))
    theirs = layers(LoRASettings(rank=RANK, alpha=ALPHA, train_text_encoder=True, type=kind))
    assert set(theirs) >= set(plain)
    if kind == "locon":  # and the ResNet blocks' convolutions in SGM's names
        assert "lora_unet_input_blocks_1_0_in_layers_2" in theirs
    else:
        assert set(theirs) == set(plain)
    assert any(m.startswith("lora_unet_input_blocks_") for m in theirs)
    assert any(m.startswith("lora_te1_text_model_") for m in theirs)
    assert any(m.startswith("lora_te2_text_model_") for m in theirs)
    marker = {"locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1", "dora": "dora_scale"}[kind]
    assert all(marker in suffixes for suffixes in theirs.values())
