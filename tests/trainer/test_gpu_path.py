"""What would crash or train wrong on the first real GPU run, caught on a CPU.

Each test here failed on the trainer as it was before the GPU path was read against diffusers'
DreamBooth scripts and kohya's (the defects are listed in each test's docstring).  Where the
defect is in what a GPU answers (its compute capability, its free memory, which GPU a process
has), the device queries are mocked; where it is a tensor made on the CPU beside one on the GPU,
the code runs under ``FakeTensorMode`` with a fake ``cuda`` device, where mixing devices raises
as it does on a GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from finetune_api.report import ExitCode
from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer import class_images, data, job, lora, prompt_cache
from finetune_trainer.errors import BadInput
from finetune_trainer.families import Conditioning, family_of
from finetune_trainer.job import Device, resolve_settings
from tests.trainer.conftest import base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def _spec(model_type: str = "v1x", **training: Any) -> Any:
    raw = base_spec(Path("/m"), Path("/d"), Path("/o"), **training)
    raw["baseModel"]["type"] = model_type
    raw["dataset"].pop("resolution")
    if model_type == "flux1":
        raw["method"] = "LoRA"
    return parse_manifest({"spec": raw}).spec


def _tiny_base(model_type: str, tmp_path: Path) -> Any:
    """A tiny random pipeline of the family, read back as the trainer reads a base model."""
    from finetune_trainer.model import load_base_model
    from finetune_trainer.tiny import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sdxl_pipeline

    if model_type == "sdxl":
        folder = build_tiny_sdxl_pipeline(tmp_path / "m")
    elif model_type == "flux1":
        folder = build_tiny_flux_pipeline(tmp_path / "m")
    else:
        folder = build_tiny_pipeline(tmp_path / "m", model_type=model_type)
    spec = _spec(model_type)
    return load_base_model(spec.base_model.model_copy(update={"uri": folder.as_uri()}), cache_dir=tmp_path / "c")


def _renderer(base: Any, folder: Path, *, dtype: torch.dtype, steps: int = 2, prompt_inputs: Any = None) -> Any:
    """The sample renderer of one prompt at 64 px on this CPU."""
    from finetune_api.v1alpha1 import Samples
    from finetune_trainer import samples

    return samples.SampleRenderer(
        Samples(prompts=["a photo of sks ball"], numInferenceSteps=steps),
        resolution=64,
        base=base,
        folder=folder,
        device=torch.device("cpu"),
        dtype=dtype,
        prompt_inputs=prompt_inputs,
    )


class _FakeCuda:
    """torch.cuda as a machine with GPUs answers it: ``capability`` per GPU, memory free and
    total, and which GPU was made current."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, capability: tuple[int, int], emulated_bf16: bool = True):
        self.current: list[int] = []
        self.capability = capability
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: self.current.append(int(index)))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: self.capability)
        # Since torch 2.3 this says yes for GPUs that only emulate bf16 (T4, V100, RTX 20xx).
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulated_bf16)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (self.free(index), 16 * GIB))
        props = type("Props", (), {"total_memory": 16 * GIB})
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(job, "compiler_present", lambda *, cuda: True)

    def free(self, index: int | None) -> int:
        # GPU 0 is busier than GPU 1: what is read tells which GPU was asked.
        return (10 if (index or 0) == 0 else 14) * GIB


def test_bf16_is_chosen_only_on_gpus_that_compute_it_in_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: torch.cuda.is_bf16_supported() counts emulation since torch 2.3, so a T4 (compute
    capability 7.5) took every default job (fp16, preferBf16) to bf16, where cuDNN has no bf16
    convolutions.  (Device queries mocked.)"""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    t4 = _FakeCuda(monkeypatch, capability=(7, 5))
    device = job.detect_device()
    assert device.type == "cuda" and not device.bf16
    settings, _ = resolve_settings(_spec(mixedPrecision="fp16"), device)
    assert settings.mixed_precision == "fp16"
    t4.capability = (8, 0)  # an A100
    assert job.detect_device().bf16
    assert resolve_settings(_spec(mixedPrecision="fp16"), job.detect_device())[0].mixed_precision == "bf16"


def test_each_process_probes_and_measures_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 5: every rank probed on GPU 0 (N-1 extra CUDA contexts there) and read GPU 0's total
    memory.  Now the local rank's GPU is made current first, probes run on it, and the up-front
    check reads what is free on it.  (Device queries mocked.)"""
    fake = _FakeCuda(monkeypatch, capability=(9, 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    probed: list[str] = []
    monkeypatch.setattr(job, "_installed", lambda name: name == "bitsandbytes")

    def adamw8bit(device: str) -> None:
        assert fake.current == [1], "probed before this process's GPU was made current"
        probed.append(device)

    monkeypatch.setattr(job, "_adamw8bit_step", adamw8bit)
    device = job.detect_device(_spec(optimizer="AdamW8bit"))
    assert fake.current == [1]
    assert probed == ["cuda:1"]
    assert (device.index, device.memory_bytes) == (1, 14 * GIB)  # GPU 1's free memory, not GPU 0's total


def _tiny_flux_transformer() -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


@pytest.mark.parametrize("targets", ["attention", "kohya"])
def test_the_flux_kohya_export_builds_fused_layers_beside_the_adapters_on_the_gpu(targets: str) -> None:
    """Item 2: with ``lora.targets: attention`` a fused original layer (a single block's q, k,
    v and MLP input) has parts without an adapter, whose zeros were made on the CPU and
    concatenated with the adapters still on the GPU: the run trained, then the export raised.
    Here the adapters sit on a fake cuda device, where mixing devices raises as on a GPU."""
    from finetune_api.v1alpha1 import LoRASettings

    family = family_of("flux1")
    transformer = _tiny_flux_transformer()
    settings = LoRASettings(rank=2, alpha=2, targets=targets)
    lora.add_adapters(transformer, [], settings, family=family)
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer.to("cuda")
        assert next(p for p in transformer.parameters() if p.requires_grad).device.type == "cuda"
        tensors = lora.kohya_state_dict(family, transformer, [], alpha=2.0, dtype=torch.float16)
        diffusers = lora.diffusers_layers(lora.adapter_state(transformer), text_encoder=False, dtype=torch.float16)
    assert diffusers and all(t.device.type == "cpu" for t in diffusers.values())
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in tensors
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in tensors
    assert all(t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize(
    ("model_type", "kind"), [("v1x", "lora"), ("sdxl", "lora"), ("v1x", "loha"), ("v1x", "lokr"), ("sdxl", "dora")]
)
def test_the_unet_lora_exports_run_with_the_adapters_on_the_gpu(model_type: str, kind: str, tmp_path: Path) -> None:
    """The same class of defect for the UNet families' kohya and diffusers LoRA layouts, and
    LoRA's other kinds (a LoKr's scale is applied to w1 where the adapters are)."""
    from diffusers import UNet2DConditionModel

    from finetune_api.v1alpha1 import LoRASettings
    from finetune_trainer.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    folder = (build_tiny_sdxl_pipeline if model_type == "sdxl" else build_tiny_pipeline)(tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    family = family_of(model_type)
    lora.add_adapters(unet, [], LoRASettings(rank=2, alpha=2, type=kind), family=family)
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet.to("cuda")
        kohya = lora.kohya_state_dict(family, unet, [], alpha=2.0, dtype=torch.float16, kind=kind, rank=2)
        diffusers = lora.diffusers_layers(lora.adapter_state(unet), text_encoder=False, dtype=torch.float16)
    assert kohya and diffusers
    assert all(t.device.type == "cpu" for t in (*kohya.values(), *diffusers.values()))


@pytest.mark.parametrize("model_type", ["v1x", "v2x", "sdxl"])
def test_the_single_file_export_runs_with_the_models_on_the_gpu(model_type: str, tmp_path: Path) -> None:
    """The full model in the original layout (the web UIs' single file), converted from
    models still on the GPU: every tensor it makes (OpenCLIP's fused in_proj, the renamed
    keys) beside the models' own."""
    from finetune_trainer import export

    base = _tiny_base(model_type, tmp_path)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in (base.unet, base.vae, *base.text_encoders):
            module.to("cuda")
        trained = export.Trained(unet=base.unet, vae=base.vae, text_encoders=base.text_encoders, base=base)
        state = export.original_state_dict(trained)
        elsewhere = sorted(k for k, t in state.items() if t.device.type != "cuda")
        assert state and not elsewhere, elsewhere[:5]
        moved = {k: v.detach().cpu() for k, v in state.items()}
    assert all(t.device.type == "cpu" for t in moved.values())


def test_device_provenance_sees_a_host_tensor_beside_device_ones() -> None:
    """The check the sample tests rest on: the Flux kohya export's defect (zeros made on the
    host, concatenated with an adapter on the device) is seen; the same with ``device=`` given,
    a 0-dim host tensor, and a host tensor moved with ``.to(device)`` are not."""
    from tests.trainer.device_provenance import DeviceProvenance

    adapter = torch.nn.Linear(4, 2)
    mode = DeviceProvenance.of_models(adapter)
    with mode:
        torch.cat([adapter.weight, torch.zeros(2, 4, device=adapter.weight.device)])
        adapter.weight * torch.tensor(2.0)
        adapter.weight + torch.ones(2, 4).to(adapter.weight.device)
    assert mode.first is None
    with mode:
        torch.cat([adapter.weight.detach(), torch.zeros(2, 4)])
    assert mode.first is not None and mode.first.startswith("cat:")


@pytest.mark.parametrize("model_type", ["v1x", "sdxl", "flux1"])
def test_samples_make_no_host_tensor_beside_the_models_ones(model_type: str, tmp_path: Path) -> None:
    """The sample path of each family (our renderer, the family's pipeline, the VAE decoded
    outside autocast), followed by ``DeviceProvenance``: what would raise on a GPU because a
    tensor was made on the host is seen here."""
    from tests.trainer.device_provenance import DeviceProvenance

    base = _tiny_base(model_type, tmp_path)
    denoiser = base.denoiser()
    renderer = _renderer(base, tmp_path / "samples", dtype=torch.bfloat16)
    mode = DeviceProvenance.of_models(denoiser, base.vae, *base.text_encoders)
    with mode:
        rendered = renderer.render(1, unet=denoiser, text_encoders=base.text_encoders)
    assert rendered.failures == []
    assert mode.first is None, mode.first


def test_flux_samples_from_prompts_cached_in_host_memory_come_to_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux renders from cached embeddings (its text encoders have left); those past the
    cache's GPU share wait in host memory and must come over when used.  A cache that handed
    them out as they are is seen (the check can fail); ours is not."""
    from tests.trainer.device_provenance import DeviceProvenance

    base = _tiny_base("flux1", tmp_path)
    family = base.family
    prompt = "a photo of sks ball"
    ids = list(family.tokenize(base.tokenizers, [prompt]))
    # As on a GPU: the training device is not host memory, and no GPU share is left.
    monkeypatch.setattr(prompt_cache.PromptCache, "remote", property(lambda self: True))

    def render(*, moved: bool) -> str | None:
        cache = prompt_cache.PromptCache(device=torch.device("cpu"), device_bytes=0)

        def get(text: str) -> Any:
            return cache.get(text) if moved else cache._entries[text]

        renderer = _renderer(
            base,
            tmp_path / f"samples-{moved}",
            dtype=torch.float32,
            prompt_inputs=lambda text: family.prompt_inputs(get(text)),
        )
        denoiser = base.denoiser()
        mode = DeviceProvenance.of_models(denoiser, base.vae, *base.text_encoders)
        with mode:
            with torch.no_grad():
                encoded = family.encode(base.text_encoders, ids).one(0)
            assert cache.put(prompt, encoded)
            assert cache.on_host > 0 and cache.on_device == 0
            rendered = renderer.render(1, unet=denoiser, text_encoders=base.text_encoders)
        assert rendered.failures == []
        return mode.first

    assert render(moved=False) is not None
    assert render(moved=True) is None


def test_the_prompt_cache_is_bounded_in_bytes_and_counted_in_the_estimate() -> None:
    """Item 4: every distinct prompt's embeddings were kept on the GPU, up to 4,096 of them: for
    Flux (T5-XXL, 512 x 4,096) 16-32 GiB with shuffled captions, counted nowhere.  Now the
    cache holds at most its device share there (the rest in host memory, then nothing), and the
    up-front estimate counts that share; with shuffled captions nothing is cached."""
    flux_prompt = Conditioning(
        torch.empty(512, 4096, dtype=torch.bfloat16, device="meta"),
        torch.empty(768, dtype=torch.bfloat16, device="meta"),
    )
    assert prompt_cache.size_of(flux_prompt) == 4 * 2**20 + 1536  # Flux.1's real size in bf16
    assert prompt_cache.DEVICE_BYTES // prompt_cache.size_of(flux_prompt) < 64

    # A cache whose device share holds two prompts: the third waits in host memory, the
    # fifth finds no room.
    cache = prompt_cache.PromptCache(device="meta", device_bytes=2 * 4096, host_bytes=2 * 4096)
    entries = [Conditioning(torch.zeros(1024)) for _ in range(5)]
    kept = [cache.put(f"p{i}", c) for i, c in enumerate(entries)]
    assert kept == [True, True, True, True, False]
    assert (cache.on_device, cache.on_host) == (2 * 4096, 2 * 4096)
    assert cache.get("p0") is not None and cache.get("p0").hidden.device.type == "meta"  # type: ignore[union-attr]
    assert cache.get("p3").hidden.device.type == "meta"  # type: ignore[union-attr]  # copied over when used
    assert cache.get("p4") is None

    family = family_of("flux1")
    spec = _spec("flux1", optimizer="AdamW8bit")
    estimate = job.run_memory(spec, family, mixed_precision="bf16", optimizer="AdamW8bit")
    bare = family.memory_needed(spec, mixed_precision="bf16", optimizer="AdamW8bit")
    assert estimate.bytes - bare.bytes == pytest.approx(prompt_cache.DEVICE_BYTES)
    assert "cached prompts" in estimate.basis
    shuffled = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"shuffle_caption": True})})
    assert job.prompt_cache_bytes(shuffled) == 0


def test_latents_are_cached_in_batches_the_free_memory_holds(tmp_path: Path) -> None:
    """Item 6: the latent cache encoded 8 images a pass (16 with random flips): for SDXL's fp32
    VAE at 1024 px some 12-24 GiB on top of the loaded models, an OOM in the caching stage on
    cards the memory check accepts.  Now the batch comes from the resolution and the free
    memory (1 where little is free, as kohya's vae_batch_size), and the estimate counts one
    picture's pass where it is more than a step's activations."""
    # SDXL's VAE in fp32 at 1024 px, random flips, 6 GiB free on a 16 GB card: one at a time.
    assert job.caching_batch(1024, dtype_bytes=4, variants=2, free_bytes=6 * GIB) == 1
    assert job.caching_batch(1024, dtype_bytes=4, variants=2, free_bytes=60 * GIB) == 8
    assert job.caching_batch(512, dtype_bytes=2, variants=1, free_bytes=8 * GIB) == 8
    assert job.caching_batch(1024, dtype_bytes=4, variants=2, free_bytes=None) == job.MAX_CACHING_BATCH  # a CPU
    assert job.vae_encode_bytes(1024, dtype_bytes=4, images=16) >= 20 * GIB  # what the 16 at once took

    # The cache passes the VAE as many examples at once as it was given.
    from finetune_trainer.buckets import Bucket

    passes: list[int] = []

    class Vae:
        def encode(self, pixels: torch.Tensor) -> Any:
            passes.append(int(pixels.shape[0]))
            latent = torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": latent, "std": latent})})()

    examples = [
        data.Example(path=tmp_path / f"{i}.png", pixels=torch.zeros(3, 64, 64, dtype=torch.uint8), prompt="p")
        for i in range(5)
    ]
    cache = data.LatentCache(
        Vae(),
        examples,
        center_crop=True,
        random_flip=True,
        seed=0,
        stream=0,
        device="cpu",
        dtype=torch.float32,
        batch_size=2,
    )
    cache.fill([(i, Bucket(64, 64)) for i in range(5)])
    assert passes == [4, 4, 2]  # two examples, each with its flip, a pass

    # The SDXL estimate with cached latents counts the VAE's pass where activations are smaller.
    sdxl = family_of("sdxl")
    spec = _spec("sdxl", optimizer="AdamW8bit", cacheLatents=True)
    spec = spec.model_copy(update={"method": "LoRA"})
    with_caching = job.run_memory(spec, sdxl, mixed_precision="fp16", optimizer="AdamW8bit")
    bare = sdxl.memory_needed(spec, mixed_precision="fp16", optimizer="AdamW8bit")
    caching = job.vae_encode_bytes(1024, dtype_bytes=4, images=1)
    expected = bare.bytes + prompt_cache.DEVICE_BYTES + max(0.0, caching - bare.activations)
    assert with_caching.bytes == pytest.approx(expected)


def test_a_single_file_flux_transformer_is_read_onto_its_device_and_quantized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 7: the single file went through diffusers' from_single_file, which (0.42.1) ignores
    device_map (the whole transformer is read into host memory, then left on the CPU) and
    refuses a bitsandbytes quantization of weights not yet quantized.  Now the file becomes a
    diffusers folder once, read by from_pretrained with the device and quantization a folder
    gets.  (from_pretrained's device placement and quantization mocked: this machine has no
    GPU.)"""
    from diffusers import FluxTransformer2DModel

    from finetune_trainer.families import LoadOptions
    from finetune_trainer.tiny import build_tiny_flux_pipeline, write_flux_single_file

    folder = build_tiny_flux_pipeline(tmp_path / "flux")
    single = write_flux_single_file(folder, tmp_path / "flux1-tiny.safetensors")
    calls: list[dict[str, Any]] = []
    real = FluxTransformer2DModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, path: Any, **kwargs: Any) -> Any:
        calls.append({"path": Path(path), **kwargs})
        kwargs.pop("device_map", None)
        kwargs.pop("quantization_config", None)
        return real(cls, path, **kwargs)

    def from_single_file(cls: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_single_file places nothing on the GPU and cannot quantize the file")

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(FluxTransformer2DModel, "from_single_file", classmethod(from_single_file))
    family = family_of("flux1")
    scratch = tmp_path / "scratch"
    for quantization in ("none", "nf4"):
        options = LoadOptions(precision="bf16", quantization=quantization, device="cuda:1", scratch=str(scratch))
        base = family.load_original_file(single, model_type="flux1", components=folder, options=options)
        transformer = base.load_unet()
        call = calls[-1]
        assert call["path"].is_relative_to(scratch)
        if quantization == "none":
            assert call["device_map"] == {"": "cuda:1"}
        else:
            assert call["quantization_config"].load_in_4bit
        reference = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(transformer.state_dict()[name], tensor), name
    assert len(list(scratch.iterdir())) == 1  # converted once, read twice


def test_samples_decode_outside_autocast_in_the_vaes_precision(tmp_path: Path) -> None:
    """Item 8: the samples (and class images) ran the whole pipeline under autocast, so SDXL's
    VAE, kept in fp32 because it overflows in fp16, decoded in fp16 anyway: black pictures, and
    black class images that prior preservation then trained toward."""
    base = _tiny_base("sdxl", tmp_path)
    seen: list[tuple[bool, torch.dtype]] = []
    decode = base.vae.decode

    def spy(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((torch.is_autocast_enabled("cpu"), latents.dtype))
        return decode(latents, *args, **kwargs)

    base.vae.decode = spy
    renderer = _renderer(base, tmp_path / "samples", dtype=torch.bfloat16, steps=1)
    rendered = renderer.render(1, unet=base.unet, text_encoders=base.text_encoders)
    assert rendered.failures == [] and len(rendered.paths) == 1
    assert seen == [(False, torch.float32)]
    assert base.vae.decode is spy  # put back as it was


def test_a_class_image_folder_of_blank_pictures_is_refused(photos: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Item 8: black class images (an earlier run's overflowed VAE) stayed in the folder and
    were reused by every later run.  Now a run refuses them, naming the folder and the fix."""
    from PIL import Image

    blank = tmp_path / "class"
    blank.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (0, 0, 0)).save(blank / f"class-{index:05d}.png")
    Image.new("RGB", (64, 64), (90, 120, 30)).save(blank / "class-00002.png")
    spec = base_spec(tiny_model, photos, tmp_path / "out")
    spec["dataset"].update(
        priorPreservation=True, classPrompt="a photo of a ball", classImages=blank.as_uri(), numClassImages=3
    )
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "log")
    assert run.code == ExitCode.BAD_INPUT, run.summary
    message = run.summary["message"]
    assert message.startswith("spec.dataset.classImages: 2 of the 3 class images in ")
    assert "one flat colour" in message and "delete them" in message

    pictures = data.load_folder(blank, prompt="p", resolution=64, field_name="x").examples
    assert [e.path.name for e in class_images.blank(pictures)] == ["class-00000.png", "class-00001.png"]
    with pytest.raises(BadInput, match=r"spec\.dataset\.classImages"):
        class_images.refuse_blank(pictures, folders=[blank], field="spec.dataset.classImages")


def test_only_input_errors_of_a_transformer_read_are_bad_input() -> None:
    """Item 9: any RuntimeError while reading the Flux transformer (a CUDA error, a bitsandbytes
    kernel that fails on this GPU, memory that runs out) became BadInput, which is not retried."""
    from finetune_trainer.families import LoadOptions
    from finetune_trainer.families.flux import _load_transformer

    def failing(error: BaseException) -> Any:
        def read(**kwargs: Any) -> Any:
            raise error

        return read

    for error in (
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("Error named symbol not found at line 449 in file /src/csrc/ops.cu"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ):
        with pytest.raises(type(error)) as raised:
            _load_transformer(failing(error), options=LoadOptions(), config={}, what="flux1-dev.safetensors")
        assert not isinstance(raised.value, BadInput)
    for error in (
        RuntimeError("Error(s) in loading state_dict for FluxTransformer2DModel:\n\tsize mismatch for x"),
        OSError("no file named diffusion_pytorch_model.safetensors"),
        ValueError("Cannot load because x expected shape"),
    ):
        with pytest.raises(BadInput, match=r"spec\.baseModel\.uri"):
            _load_transformer(failing(error), options=LoadOptions(), config={}, what="flux1-dev.safetensors")


@pytest.mark.parametrize(
    ("model_type", "buckets", "compiled"),
    [
        ("v1x", False, True),
        ("v1x", True, False),
        ("v2x-512", False, False),
        ("sdxl", False, False),
        ("flux1", False, False),
    ],
)
def test_an_unset_compile_is_on_only_where_it_was_measured_to_pay(
    model_type: str, buckets: bool, compiled: bool
) -> None:
    """Item 9: auto-compile at >= 2,500 steps was measured for SD 1.5 at one size only; with
    buckets every size compiles mid-run, and a 12 B Flux compile is unmeasured."""
    h100 = Device(type="cuda", bf16=True, bitsandbytes=True, compiler=True)
    spec = _spec(model_type)
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"buckets": buckets})})
    settings, _ = resolve_settings(spec, h100, total_steps=10**5)
    assert settings.compile is compiled


def test_gpu_check_prints_its_plan_on_a_cpu() -> None:
    """``make gpu-check`` without a GPU: what it would run, and exit 0."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    for name in ("precision", "sdxl-lora-te", "flux-nf4-folder", "flux-nf4-single-file", "adamw8bit", "compile"):
        assert f"  {name} " in done.stdout
    assert "gpu-check.md" in done.stdout
