"""Flux.1 on a tiny random Flux pipeline the tests build (a transformer with double- and
single-stream blocks and the guidance embedding, a T5 encoder with a unigram tokenizer written
here, CLIP, a 16-channel VAE): a LoRA run through ``finetune-trainer run`` lowers the
flow-matching loss at fixed noise; its two LoRA files load through diffusers into
``FluxPipeline`` and render the same image; the kohya/ComfyUI layout and the original
single-file layout agree with diffusers' own converters at Flux.1's real widths; a killed run
resumes to the same adapters; two processes train what one trains with the doubled batch; the
single-file transformer reads as the folder's; a quantized base falls back on this CPU, naming
the setting; a run that cannot fit the GPU is refused naming the settings that would."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import BaseModelSource, ModelType, parse_manifest
from finetune_trainer.errors import BadInput
from tests.trainer.conftest import Run, base_spec, manifest, run_cli, run_killed_while_checkpointing

pytestmark = pytest.mark.trainer

PROMPT = "a photo of sks ball"
MAX_LENGTH = 32  # the tiny T5 tokenizer's window


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "model", seed=0)


def flux_spec(model: Path | str, photos: Path, output: Path, **training: Any) -> dict[str, Any]:
    spec = base_spec(Path("/unused"), photos, output, **training)
    spec["baseModel"] = {"uri": model if isinstance(model, str) else model.as_uri(), "type": "flux1"}
    spec["method"] = "LoRA"
    spec["training"].setdefault("lora", {"rank": 4, "alpha": 4})
    return spec


def _run(tmp_path: Path, name: str, spec: dict[str, Any]) -> Run:
    output = Path(spec["output"]["uri"].removeprefix("file://"))
    run = run_cli(manifest(tmp_path / f"{name}.yaml", name=name, **spec), output, tmp_path / f"{name}-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def flow_loss(pipe: Any, photos: Path) -> float:
    """The rectified-flow loss of the pipeline's transformer on the photos at fixed noise and
    sigmas, written from FluxPipeline's own parts: VAE latents with the shift and scale factors,
    the prompt through ``encode_prompt``, latents packed with their image ids, dev's guidance at
    1, the velocity ``noise - x`` as the target."""
    from finetune_trainer import data

    examples = data.load_folder(photos, prompt=PROMPT, resolution=64, field_name="x").examples
    pixels = torch.stack([data.crop_and_flip(e.pixels, 64, center=True, flip=False) for e in examples])
    config = pipe.vae.config
    gen = torch.Generator().manual_seed(3)
    total = 0.0
    with torch.no_grad():
        x = (pipe.vae.encode(pixels).latent_dist.mean - config.shift_factor) * config.scaling_factor
        hidden, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=MAX_LENGTH)
        n, c, h, w = x.shape
        image_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32)
        for _ in range(6):
            noise = torch.randn(x.shape, generator=gen)
            sigmas = torch.rand(n, generator=gen)
            noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x + sigmas.view(-1, 1, 1, 1) * noise
            velocity = pipe.transformer(
                hidden_states=pipe._pack_latents(noisy, n, c, h, w),
                timestep=sigmas,
                guidance=torch.ones(n),
                pooled_projections=pooled.repeat(n, 1),
                encoder_hidden_states=hidden.repeat(n, 1, 1),
                txt_ids=text_ids,
                img_ids=image_ids,
            ).sample
            target = pipe._pack_latents(noise - x, n, c, h, w)
            total += float(torch.nn.functional.mse_loss(velocity, target))
    return total / 6


def render(pipe: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=MAX_LENGTH,
        generator=generator,
        output_type="pt",
    ).images
    return torch.as_tensor(images)


@pytest.fixture
def kohya_flux_loader_at_tiny_widths(tiny_flux: Path) -> Iterator[None]:
    """diffusers' kohya-Flux converter, unchanged but for one constant: it splits a single
    block's fused q, k, v and MLP rows at Flux.1's widths (3072 x 3 and 12288), which a tiny
    model does not have.  The same code with the tiny model's widths; at Flux.1's real widths
    the unchanged converter reads our layout (test_kohya_layout_at_flux1_widths...)."""
    import diffusers.loaders.lora_conversion_utils as conversion
    import diffusers.loaders.lora_pipeline as lora_pipeline

    config = json.loads((tiny_flux / "transformer" / "config.json").read_text())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    source = inspect.getsource(conversion._convert_kohya_flux_lora_to_diffusers)
    constant = "dims=[3072, 3072, 3072, 12288]"
    assert source.count(constant) == 1, "diffusers' converter changed: revisit this fixture"
    namespace = dict(conversion.__dict__)
    exec(source.replace(constant, f"dims=[{width}, {width}, {width}, {4 * width}]"), namespace)
    original = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = namespace["_convert_kohya_flux_lora_to_diffusers"]
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = original


@pytest.fixture(scope="module")
def flux_lora(tiny_flux: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("flux-lora")
    spec = flux_spec(tiny_flux, photos, root / "out", maxSteps=10, learningRate=5e-3, batchSize=4)
    spec["dataset"]["centerCrop"] = True
    spec["samples"] = {"prompts": [PROMPT], "numInferenceSteps": 2}
    return _run(root, "fl", spec)


def test_a_flux_lora_learns_and_both_files_load_in_flux_pipeline_alike(
    flux_lora: Run, tiny_flux: Path, photos: Path, kohya_flux_loader_at_tiny_widths: None
) -> None:
    from diffusers import FluxPipeline

    out = flux_lora.output
    settings = flux_lora.summary["settings"]
    assert (settings["prediction_type"], settings["timestep_sampling"], settings["buckets"]) == (
        "flow_matching",
        "logit_normal",
        "true",
    )
    events = [line for line in flux_lora.lines if line.get("event") == "text-encoders-released"]
    assert events, "the text encoders never left"
    assert (out / "samples" / "step-000010-0.png").is_file()

    base = FluxPipeline.from_pretrained(tiny_flux)
    before, base_image = flow_loss(base, photos), render(base)
    diffusers_layout = FluxPipeline.from_pretrained(tiny_flux)
    diffusers_layout.load_lora_weights(out / "lora")
    after, image = flow_loss(diffusers_layout, photos), render(diffusers_layout)
    assert after < before - 0.01, (before, after)
    assert float((image - base_image).abs().max()) > 1e-3

    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert all(k.startswith("transformer.") and ".lora_" in k for k in handle.keys())  # noqa: SIM118
    with safe_open(str(out / "fl-lora.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    # The original layout's module names, the fused q, k, v and single-block linear1 included.
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_txt_mod_lin.lora_up.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert {k.split(".")[0].split("_blocks_")[0] for k in keys} == {"lora_unet_double", "lora_unet_single"}
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_network_module"] == "networks.lora_flux"

    kohya_layout = FluxPipeline.from_pretrained(tiny_flux)
    kohya_layout.load_lora_weights(str(out / "fl-lora.safetensors"))
    torch.testing.assert_close(render(kohya_layout), image, rtol=0, atol=1e-5)
    assert flow_loss(kohya_layout, photos) == pytest.approx(after, rel=1e-5)


def test_clip_adapters_travel_in_both_files(
    tiny_flux: Path, photos: Path, tmp_path: Path, kohya_flux_loader_at_tiny_widths: None
) -> None:
    """lora.trainTextEncoder puts adapters on CLIP (not T5): lora_te1_* in kohya's file,
    text_encoder.* in diffusers', the same text encoder from both."""
    from diffusers import FluxPipeline

    spec = flux_spec(tiny_flux, photos, tmp_path / "out", maxSteps=2, learningRate=5e-3, batchSize=2)
    spec["training"]["lora"] = {"rank": 4, "alpha": 8, "trainTextEncoder": True, "targets": "attention"}
    run = _run(tmp_path, "te", spec)
    assert not [line for line in run.lines if line.get("event") == "text-encoders-released"]
    with safe_open(str(run.output / "te-lora.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    # attention targets: a single block's q, k, v in its fused linear1, the MLP part left at zero.
    linear1 = load_file(str(run.output / "te-lora.safetensors"))["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (7 * 32, 4 * 4) and float(linear1[3 * 32 :].abs().max()) == 0.0
    pipes = []
    for source in (run.output / "lora", run.output / "te-lora.safetensors"):
        pipe = FluxPipeline.from_pretrained(tiny_flux)
        pipe.load_lora_weights(str(source))
        pipes.append(pipe)
    ids = pipes[0].tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = [p.text_encoder(ids).pooler_output for p in pipes]
        plain = FluxPipeline.from_pretrained(tiny_flux).text_encoder(ids).pooler_output
    assert float((pooled[0] - plain).abs().max()) > 1e-5
    torch.testing.assert_close(pooled[1], pooled[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(render(pipes[1]), render(pipes[0]), rtol=0, atol=1e-5)


def _adapters_at_flux1_widths(targets: str) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A Flux.1-wide transformer of one block of each kind on the meta device (no memory), and
    random rank-4 adapters on the modules peft would adapt for ``targets``."""
    import re

    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from finetune_api.v1alpha1 import LoRATargets
    from finetune_trainer.families.base import CONFIGS
    from finetune_trainer.families.flux import FLUX_TARGETS

    config = FluxTransformer2DModel.load_config(CONFIGS / "flux1" / "transformer")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    pattern = re.compile(FLUX_TARGETS[LoRATargets(targets)])
    gen = torch.Generator().manual_seed(0)
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            a = torch.randn(4, module.in_features, generator=gen)
            b = torch.randn(module.out_features, 4, generator=gen)
            pairs[name] = (a, b)
    return model, pairs


@pytest.mark.parametrize(("targets", "modules"), [("kohya", 20), ("attention", 7)])
def test_kohya_layout_at_flux1_widths_reads_back_through_diffusers_unchanged_converter(
    targets: str, modules: int, tmp_path: Path
) -> None:
    """Our kohya/ComfyUI Flux file for a model of Flux.1's widths, read by diffusers'
    ``FluxPipeline.lora_state_dict`` (its kohya-Flux converter, unchanged): every adapted module
    comes back with our up x down x alpha / rank, a part with no adapter (attention targets:
    the single block's MLP input) with zero; text encoder layers with them."""
    from diffusers import FluxPipeline

    from finetune_trainer import lora
    from finetune_trainer.families.flux import FLUX

    model, pairs = _adapters_at_flux1_widths(targets)
    assert len(pairs) == modules
    gen = torch.Generator().manual_seed(1)
    text = {"text_model.encoder.layers.0.self_attn.q_proj": (torch.randn(4, 768, generator=gen), torch.randn(768, 4))}
    alpha = 8.0
    tensors = lora.kohya_tensors(FLUX, model, pairs, [text], alpha=alpha, dtype=torch.float32)
    save_file(tensors, str(tmp_path / "flux-lora.safetensors"))
    state = FluxPipeline.lora_state_dict(str(tmp_path / "flux-lora.safetensors"))
    state = state[0] if isinstance(state, tuple) else state

    def product(prefix: str, module: str) -> torch.Tensor:
        return state[f"{prefix}.{module}.lora_B.weight"].double() @ state[f"{prefix}.{module}.lora_A.weight"].double()

    for module, (a, b) in pairs.items():
        torch.testing.assert_close(product("transformer", module), (b.double() @ a.double()) * alpha / 4)
    loaded = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    extra = {m.removeprefix("transformer.") for m in loaded if m.startswith("transformer.")} - set(pairs)
    for module in extra:
        assert module.endswith("proj_mlp"), module  # a zero part of a fused layer
        assert float(product("transformer", module).abs().max()) == 0.0
    assert len(extra) == (1 if targets == "attention" else 0)
    # The text encoder's layers come back in diffusers' older names (q_proj as to_q_lora.down/up),
    # which load_lora_weights maps onto CLIP.
    ((a, b),) = text.values()
    layer = "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora"
    loaded_text = state[f"{layer}.up.weight"].double() @ state[f"{layer}.down.weight"].double()
    torch.testing.assert_close(loaded_text, (b.double() @ a.double()) * alpha / 4)


def test_original_layout_is_diffusers_single_file_converters_at_flux1_widths() -> None:
    """The original (BFL) layout table against diffusers' own single-file converter, which splits
    rows at Flux.1's widths: a checkpoint of two blocks of each kind whose every tensor is one
    column of row ids converts to the very same tensors both ways, and back."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from finetune_trainer import flux_layout

    width, mlp = 3072, 12288
    rows = {
        "img_in": width,
        "txt_in": width,
        "time_in.in_layer": width,
        "time_in.out_layer": width,
        "vector_in.in_layer": width,
        "vector_in.out_layer": width,
        "guidance_in.in_layer": width,
        "guidance_in.out_layer": width,
        "final_layer.linear": 64,
        "final_layer.adaLN_modulation.1": 2 * width,
    }
    norms = []
    for i in range(2):
        o = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            rows |= {
                f"{o}.{stream}_mod.lin": 6 * width,
                f"{o}.{stream}_attn.qkv": 3 * width,
                f"{o}.{stream}_attn.proj": width,
                f"{o}.{stream}_mlp.0": mlp,
                f"{o}.{stream}_mlp.2": width,
            }
            norms += [f"{o}.{stream}_attn.norm.query_norm", f"{o}.{stream}_attn.norm.key_norm"]
        o = f"single_blocks.{i}"
        rows |= {f"{o}.modulation.lin": 3 * width, f"{o}.linear1": 3 * width + mlp, f"{o}.linear2": width}
        norms += [f"{o}.norm.query_norm", f"{o}.norm.key_norm"]
    checkpoint: dict[str, torch.Tensor] = {}
    start = 0
    for name, count in rows.items():
        for param, shape in (("weight", (count, 1)), ("bias", (count,))):
            checkpoint[f"{name}.{param}"] = torch.arange(start, start + count, dtype=torch.float64).reshape(shape)
            start += count
    for name in norms:
        checkpoint[f"{name}.scale"] = torch.arange(start, start + 128, dtype=torch.float64)
        start += 128

    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    ours, missing, leftover = flux_layout.from_original(dict(checkpoint))
    assert (missing, leftover) == ([], [])
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    back = flux_layout.to_original(ours)
    assert back.keys() == checkpoint.keys()
    assert all(torch.equal(back[k], v) for k, v in checkpoint.items())


@pytest.mark.parametrize(("folder", "params", "keys", "detected"), [
    ("flux1", 11_901_408_320, 780, "flux-dev"),
    ("flux1-schnell", 11_891_178_560, 776, "flux-schnell"),
])  # fmt: skip
def test_shipped_flux_configs_are_flux1(folder: str, params: int, keys: int, detected: str) -> None:
    """Built on the meta device: the transformer's published 11.9 B parameters (schnell without
    the guidance embedder), T5-XXL's encoder 4.76 B, CLIP ViT-L 123 M, the VAE 84 M; in the
    original layout the key count of flux1-dev.safetensors / flux1-schnell.safetensors, and
    diffusers' own model-type detection says which it is."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from finetune_trainer import flux_layout
    from finetune_trainer.families.base import CONFIGS

    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(CONFIGS / folder / "transformer")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "flux1" / "vae"))
        t5 = T5EncoderModel(T5Config.from_pretrained(CONFIGS / "flux1" / "text_encoder_2"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "flux1" / "text_encoder"))
    t5.tie_weights()  # the encoder's embedding is the shared one, as in the released weights

    def count(model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(transformer) == params
    assert (count(t5), count(clip), count(vae)) == (4_762_310_656, 123_060_480, 83_819_683)
    original = flux_layout.to_original(transformer.state_dict())
    assert len(original) == keys
    assert infer_diffusers_model_type(original) == detected


def test_the_single_file_transformer_reads_as_the_folder_does(tiny_flux: Path, tmp_path: Path) -> None:
    """The tiny transformer written in the original layout (and under ComfyUI's prefix), read
    with spec.baseModel.componentsUri: the folder's very weights.  Without componentsUri, or with
    it beside a folder, bad input naming it; a Flux file declared v1x names flux1."""
    from finetune_trainer.model import load_base_model
    from finetune_trainer.tiny import write_flux_single_file

    folder = load_base_model(BaseModelSource(uri=str(tiny_flux), type=ModelType.FLUX1), cache_dir=tmp_path)
    expected = folder.denoiser().state_dict()
    for prefix in ("", "model.diffusion_model."):
        single = write_flux_single_file(tiny_flux, tmp_path / prefix / "flux1-tiny.safetensors", prefix=prefix)
        source = BaseModelSource(uri=str(single), type=ModelType.FLUX1, components_uri=str(tiny_flux))
        base = load_base_model(source, cache_dir=tmp_path)
        assert base.denoiser().config.guidance_embeds is True
        state = base.denoiser().state_dict()
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
    with pytest.raises(BadInput, match=r"spec\.baseModel\.componentsUri: .*single-file transformer"):
        load_base_model(BaseModelSource(uri=str(single), type=ModelType.FLUX1), cache_dir=tmp_path)
    with pytest.raises(BadInput, match=r"spec\.baseModel\.componentsUri: .*remove it"):
        load_base_model(
            BaseModelSource(uri=str(tiny_flux), type=ModelType.FLUX1, components_uri=str(tiny_flux)),
            cache_dir=tmp_path,
        )
    with pytest.raises(
        BadInput, match=r"spec\.baseModel\.type: .*Flux\.1 transformer; set spec\.baseModel\.type to flux1"
    ):
        load_base_model(BaseModelSource(uri=str(single), type=ModelType.V1X), cache_dir=tmp_path)
    with pytest.raises(BadInput, match=r"spec\.baseModel\.type: .*Flux\.1 pipeline folder; set .* to flux1"):
        load_base_model(BaseModelSource(uri=str(tiny_flux), type=ModelType.SDXL), cache_dir=tmp_path)


def test_an_sd_folder_declared_flux1_names_the_type(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_trainer.model import load_base_model

    with pytest.raises(
        BadInput, match=r"spec\.baseModel\.type: flux1 does not match .*set spec\.baseModel\.type to v1x"
    ):
        load_base_model(BaseModelSource(uri=str(tiny_model), type=ModelType.FLUX1), cache_dir=tmp_path)


def test_a_single_file_run_with_components_succeeds(tiny_flux: Path, photos: Path, tmp_path: Path) -> None:
    from finetune_trainer.tiny import write_flux_single_file

    single = write_flux_single_file(tiny_flux, tmp_path / "models" / "flux1-tiny.safetensors")
    spec = flux_spec(single, photos, tmp_path / "out", maxSteps=1)
    spec["baseModel"]["componentsUri"] = tiny_flux.as_uri()
    run = _run(tmp_path, "single", spec)
    assert {"lora/pytorch_lora_weights.safetensors", "single-lora.safetensors"} <= {
        f["path"] for f in run.summary["files"]
    }
    manifest_data = json.loads((run.output / "manifest.json").read_text())
    assert manifest_data["spec"]["baseModel"]["componentsUri"] == tiny_flux.as_uri()


def test_a_killed_flux_run_resumes_to_the_same_adapters(tiny_flux: Path, photos: Path, tmp_path: Path) -> None:
    def spec(output: Path) -> dict[str, Any]:
        s = flux_spec(tiny_flux, photos, output, maxSteps=8, learningRate=1e-3, batchSize=2)
        s["checkpoints"] = {"everySteps": 4, "keepLast": 2}
        s["dataset"]["randomFlip"] = True
        s["training"]["timestepSampling"] = "mode"
        return s

    straight = _run(tmp_path, "straight", spec(tmp_path / "straight"))
    killed_out = tmp_path / "killed"
    job = manifest(tmp_path / "killed.yaml", name="straight", **spec(killed_out))
    killed = run_killed_while_checkpointing(job, tmp_path, step=8)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(job, killed_out, tmp_path / "resumed-log")
    assert resumed.code == ExitCode.SUCCESS, resumed.summary
    assert "training from step 4 to 8" in {e.get("message") for e in resumed.events()}
    ours = load_file(str(killed_out / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    theirs = load_file(str(straight.output / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    # Adapters only: the checkpoint holds no frozen transformer weight.
    assert ours.keys() == theirs.keys() and all(".lora_" in k for k in ours)
    assert float(max(v.abs().max() for k, v in theirs.items() if ".lora_B." in k)) > 0
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_train_a_flux_lora_as_one_with_the_doubled_batch(
    tiny_flux: Path, photos: Path, tmp_path: Path
) -> None:
    from tests.trainer.test_data_parallel import _launch, _state

    def spec(output: Path, *, batch: int, gpus: int) -> dict[str, Any]:
        s = flux_spec(tiny_flux, photos, output, maxSteps=3, batchSize=batch, seed=21)
        # Buckets lay an epoch out in runs of batchSize photos, so orders differ with the batch
        # size; without them a slot sees the same photo whatever the split.
        s["dataset"].update(randomFlip=True, buckets=False)
        s["resources"] = {"gpus": gpus}
        return s

    one_out, two_out = tmp_path / "one", tmp_path / "two"
    one = run_cli(manifest(tmp_path / "one.yaml", name="dp", **spec(one_out, batch=2, gpus=1)), one_out, tmp_path / "l")
    assert one.code == ExitCode.SUCCESS, one.summary
    launcher = _launch(manifest(tmp_path / "two.yaml", name="dp", **spec(two_out, batch=1, gpus=2)), tmp_path)
    assert launcher.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    ones = [h[1] for h in _state(one_out, 3)["loss_history"]]
    twos = [h[1] for h in _state(two_out, 3)["loss_history"]]
    torch.testing.assert_close(torch.tensor(twos), torch.tensor(ones), rtol=1e-4, atol=1e-6)
    theirs = load_file(str(one_out / "checkpoints" / "checkpoint-000003" / "model.safetensors"))
    ours = load_file(str(two_out / "checkpoints" / "checkpoint-000003" / "model.safetensors"))
    update = torch.cat([theirs[k].flatten() for k in theirs if ".lora_B." in k])  # B starts at zero
    difference = torch.cat([(ours[k] - theirs[k]).flatten() for k in theirs])
    assert float(update.norm()) > 0
    assert float(difference.norm() / update.norm()) < 0.01


def test_a_quantized_base_falls_back_on_this_cpu_naming_the_setting(
    tiny_flux: Path, photos: Path, tmp_path: Path
) -> None:
    """bitsandbytes 0.50's own nf4 and int8 layers run on a CPU, but diffusers' quantizer wants a
    GPU: the run trains unquantized and says so, naming spec.training.baseQuantization."""
    import bitsandbytes

    from finetune_trainer.job import detect_device

    layer = bitsandbytes.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    inputs = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(inputs).float().sum().backward()
    assert inputs.grad is not None and bool(torch.isfinite(inputs.grad).all())

    for quantization in ("nf4", "int8"):
        spec = flux_spec(tiny_flux, photos, tmp_path / quantization, maxSteps=1, baseQuantization=quantization)
        device = detect_device(parse_manifest({"spec": spec}).spec)
        assert "No GPU found" in device.quantization_problem
        run = _run(tmp_path, quantization, spec)
        assert run.summary["settings"]["base_quantization"] == "none"
        (warning,) = [w for w in run.summary["warnings"] if w.startswith("spec.training.baseQuantization")]
        assert f"{quantization} needs bitsandbytes quantization through diffusers" in warning
        assert "trained unquantized" in warning


def _nf4_in_place(transformer: Any) -> Any:
    """What diffusers' bitsandbytes loader makes of the transformer (every linear of its blocks a
    4-bit NF4 layer, the rest as it was), done here with bitsandbytes' own layers, which run on
    this CPU where diffusers' quantizer will not."""
    import bitsandbytes

    for name, module in list(transformer.named_modules()):
        if not isinstance(module, torch.nn.Linear) or "transformer_blocks." not in name:
            continue
        layer = bitsandbytes.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=module.weight.dtype,
            quant_type="nf4",
        )
        layer.weight = bitsandbytes.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(transformer.get_submodule(parent), leaf, layer.to("cpu"))  # .to() quantizes
    return transformer


def test_lora_on_a_4_bit_transformer_trains_and_exports_adapters_only(
    tiny_flux: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantized path through the recipe, standing in for a GPU: the probe passes and the
    loader quantizes with bitsandbytes' layers on this CPU.  peft puts its adapters on the 4-bit
    layers, the frozen weights stay 4-bit, the loss falls, checkpoints and LoRA files hold the
    adapters alone, under the names an unquantized run writes, and load into the plain
    (unquantized) FluxPipeline."""
    from dataclasses import replace

    import bitsandbytes
    from diffusers import FluxPipeline

    from finetune_trainer import job
    from finetune_trainer.families import flux

    monkeypatch.setattr(job, "_quantized_layer", lambda quantization, **_: lambda device: None)
    real = flux._load_transformer
    seen: list[Any] = []

    def load(read: Any, *, options: Any, config: Any, what: str) -> Any:
        assert options.quantization == "nf4"
        plain = real(read, options=replace(options, quantization="none"), config=config, what=what)
        seen.append(_nf4_in_place(plain))
        return seen[-1]

    monkeypatch.setattr(flux, "_load_transformer", load)
    spec = flux_spec(tiny_flux, photos, tmp_path / "out", maxSteps=8, learningRate=5e-3, batchSize=4)
    spec["training"]["baseQuantization"] = "nf4"
    spec["dataset"]["centerCrop"] = True
    run = _run(tmp_path, "q", spec)
    assert run.summary["settings"]["base_quantization"] == "nf4"
    assert not [w for w in run.summary["warnings"] if "baseQuantization" in w]
    (transformer,) = seen
    base_layer = transformer.transformer_blocks[0].attn.to_q.base_layer
    assert isinstance(base_layer, bitsandbytes.nn.Linear4bit) and base_layer.weight.dtype == torch.uint8
    losses = [
        h[1]
        for h in json.loads((run.output / "checkpoints" / "checkpoint-000008" / "trainer_state.json").read_text())[
            "loss_history"
        ]
    ]
    assert len(losses) == 8
    checkpoint = load_file(str(run.output / "checkpoints" / "checkpoint-000008" / "model.safetensors"))
    assert checkpoint and all(".lora_" in k for k in checkpoint)
    with safe_open(str(run.output / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    before = flow_loss(pipe, photos)
    pipe.load_lora_weights(run.output / "lora")
    assert flow_loss(pipe, photos) < before


def test_flow_matching_draws_and_targets() -> None:
    """Each slot's sigma comes from its own generator (the same draw for the same slot),
    shifted as FluxPipeline shifts it at inference; the model sees (1 - sigma) x + sigma noise
    packed, with sigma as its timestep and guidance 1, and is asked for noise - x."""
    from diffusers import FluxPipeline

    from finetune_trainer.buckets import Bucket
    from finetune_trainer.families.base import Conditioning
    from finetune_trainer.families.flux import FlowMatching, unpack

    dev = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    dev |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}

    def objective(density: str, config: dict[str, Any]) -> FlowMatching:
        return FlowMatching(
            scheduler_config=config,
            shift_factor=0.1,
            scaling_factor=0.5,
            vae_scale=8,
            density=density,
            guidance=1.0,
        )

    # dev at 1024 px (4,096 tokens): FluxPipeline's mu is max_shift, the shift exp(1.15).
    assert objective("uniform", dev).shift(Bucket(1024, 1024)) == pytest.approx(3.158, abs=1e-3)
    assert objective("uniform", dev).shift(Bucket(512, 512)) == pytest.approx(1.878, abs=1e-3)
    assert objective("uniform", {"shift": 1.0}).shift(Bucket(1024, 1024)) == 1.0
    for density in ("logit_normal", "mode", "uniform"):
        flow = objective(density, {"shift": 1.0})
        draws = [flow.draw(torch.Generator().manual_seed(s), Bucket(64, 64)) for s in range(400)]
        assert all(0 <= d <= 1 for d in draws)
        assert flow.draw(torch.Generator().manual_seed(7), Bucket(64, 64)) == draws[7]
        middle = sum(0.25 < d < 0.75 for d in draws) / len(draws)
        # logit-normal (about 68% between 0.27 and 0.73) and mode (scale 1.29) gather their draws
        # mid-schedule; uniform puts half of them there.
        assert (middle > 0.6) if density != "uniform" else (0.4 < middle < 0.6), (density, middle)

    seen: dict[str, Any] = {}

    def model(**kwargs: Any) -> tuple[torch.Tensor]:
        seen.update(kwargs)
        return (torch.zeros_like(kwargs["hidden_states"]),)

    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 4, 6, generator=gen), torch.randn(2, 16, 4, 6, generator=gen)
    sigmas = torch.tensor([0.25, 0.75])
    conditioning = Conditioning(torch.randn(2, 5, 8), torch.randn(2, 8))
    predicted = objective("uniform", dev).predict(
        model, latents=latents, noise=noise, timesteps=sigmas, conditioning=conditioning, time_ids=None
    )
    x = (latents - 0.1) * 0.5
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x + sigmas.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["hidden_states"], FluxPipeline._pack_latents(noisy, 2, 16, 4, 6))
    torch.testing.assert_close(unpack(seen["hidden_states"], 4, 6), noisy)
    torch.testing.assert_close(seen["timestep"], sigmas)
    torch.testing.assert_close(seen["guidance"], torch.ones(2))
    assert seen["img_ids"].shape == (2 * 3, 3) and seen["txt_ids"].shape == (5, 3)
    torch.testing.assert_close(predicted.target, noise - x)
    assert predicted.weights is None


def test_a_resolution_flux_cannot_pack_is_refused(tiny_flux: Path, photos: Path, tmp_path: Path) -> None:
    spec = flux_spec(tiny_flux, photos, tmp_path / "out", maxSteps=1)
    spec["dataset"]["resolution"] = 72
    run = run_cli(manifest(tmp_path / "job.yaml", name="r", **spec), tmp_path / "out", tmp_path / "log")
    assert run.code == ExitCode.BAD_INPUT
    assert run.summary["message"].startswith("spec.dataset.resolution: 72 is not a multiple of 16")


def test_a_flux_run_that_cannot_fit_its_gpu_is_refused_naming_what_would(tmp_path: Path) -> None:
    """The estimates against the published peaks (1024 px, batch 1, gradient checkpointing):
    Hugging Face's QLoRA post (rank 4 on the attention projections, 8-bit AdamW) 9 GB in nf4 and
    26 GB in bf16, SimpleTuner's rank 16 on every layer a bit over 30 GB in bf16; and the
    settings named where a run does not fit."""
    from finetune_trainer.families import family_of
    from finetune_trainer.job import memory_check

    family = family_of("flux1")
    gib = 2**30

    def spec(*, rank: int = 4, targets: str = "attention", text: bool = False, **training: Any) -> Any:
        raw = flux_spec(Path("/m"), Path("/d"), tmp_path / "o", optimizer="AdamW8bit", **training)
        raw["dataset"].pop("resolution")
        raw["training"]["lora"] = {"rank": rank, "targets": targets, "trainTextEncoder": text}
        return parse_manifest({"spec": raw}).spec

    def estimate(s: Any, optimizer: str = "AdamW8bit") -> float:
        return float(family.memory_needed(s, mixed_precision="bf16", optimizer=optimizer).bytes) / 1e9

    # Encoding the prompts (T5-XXL in bf16 alone on the GPU) is the nf4 run's peak: still 16 GB.
    assert 9 <= estimate(spec(baseQuantization="nf4")) <= 11
    assert 25 <= estimate(spec()) <= 27.5
    assert 27 <= estimate(spec(rank=16, targets="kohya"), optimizer="AdamW") <= 31
    # With CLIP trained, T5 stays on the GPU: 9.5 GB more.
    assert estimate(spec(text=True)) - estimate(spec()) > 9
    assert (
        memory_check(
            spec(baseQuantization="nf4"), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=16 * gib
        )
        is None
    )
    problem = memory_check(spec(), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=24 * gib)
    assert problem is not None and problem.endswith("Settings that fit: spec.training.baseQuantization: int8")
    assert "24.0 GiB" in problem and "11.9 B-parameter transformer" in problem
    problem = memory_check(spec(), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=12 * gib)
    assert problem is not None and problem.endswith("baseQuantization: int8; spec.training.baseQuantization: nf4")
    assert memory_check(spec(), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=40 * gib) is None
    problem = memory_check(spec(), family, mixed_precision="bf16", optimizer="AdamW8bit", gpu_bytes=8 * gib)
    assert problem is not None and "no change of settings makes it fit" in problem
