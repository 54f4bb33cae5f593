"""The trainer's fast path on a CPU: it computes what the plain path computes, it reads nothing
back from the device between reports, and a compiled UNet trains.

The GPU-only parts of the fast path (bf16 for fp16, fused AdamW, pinned copies, CUDA graphs)
cannot run here; their choices are tested in test_job.py, and channels_last, which runs on
a CPU as well, is forced on below to check that checkpoints and exports survive it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from finetune_api.report import ExitCode
from finetune_trainer import job as job_module
from finetune_trainer import train
from finetune_trainer.report import ProgressReporter
from tests.trainer.conftest import Run, base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

STEPS = 6


def plain_spec(model: Path, photos: Path, output: Path, **training: Any) -> dict[str, Any]:
    """fp32, AdamW, no augmentation (centre crops, no flips): every run of it draws the same
    numbers, so runs that differ only in how they compute must agree."""
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=2, seed=11, **training)
    spec["dataset"].update(centerCrop=True, randomFlip=False)
    return spec


def loss_history(run: Run, step: int = STEPS) -> list[float]:
    state = json.loads((run.output / "checkpoints" / f"checkpoint-{step:06d}" / "trainer_state.json").read_text())
    assert [h[0] for h in state["loss_history"]] == list(range(1, step + 1))
    return [h[1] for h in state["loss_history"]]


class VaeEncodes:
    """Counts the VAE's encoder passes, and how many images went through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from diffusers import AutoencoderKL

        self.calls = 0
        self.images = 0
        real = AutoencoderKL.encode

        def encode(vae: Any, pixels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.images += pixels.shape[0]
            return real(vae, pixels, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", encode)


def _run(tmp: Path, name: str, spec: dict[str, Any]) -> Run:
    run = run_cli(manifest(tmp / f"{name}.yaml", name=name, **spec), spec_output(spec), tmp / f"{name}-log")
    assert run.code == ExitCode.SUCCESS, run.summary
    return run


def spec_output(spec: dict[str, Any]) -> Path:
    return Path(spec["output"]["uri"].removeprefix("file://"))


@pytest.fixture(scope="module")
def cached(tiny_model: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, int]]:
    """The default path: latents cached; with the number of images the VAE encoded."""
    tmp = tmp_path_factory.mktemp("cached")
    with pytest.MonkeyPatch.context() as patch:
        encodes = VaeEncodes(patch)
        run = _run(tmp, "cached", plain_spec(tiny_model, photos, tmp / "out"))
    yield run, encodes.images


# --- the latent cache is exact ---------------------------------------------------------------------


def test_cached_latents_give_the_losses_of_encoding_every_step(
    cached: tuple[Run, int], tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, cached_images = cached
    encodes = VaeEncodes(monkeypatch)
    uncached = _run(tmp_path, "uncached", plain_spec(tiny_model, photos, tmp_path / "out", cacheLatents=False))
    # The two runs took different paths: each photo encoded once, against every image of every step.
    assert cached_images == 4
    assert encodes.images == STEPS * 2
    assert run.summary["settings"]["cache_latents"] == "true"
    assert uncached.summary["settings"]["cache_latents"] == "false"

    ours, theirs = loss_history(run), loss_history(uncached)
    assert len(set(ours)) == STEPS  # a loss that moves, not a constant
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)


# --- no host synchronisation in a step --------------------------------------------------------------

# Reading a device tensor's values into Python: on a GPU each waits for every queued kernel.
_READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__format__", "__repr__"}
# Operations whose output size depends on the values: the host must wait to learn it.
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "repeat_interleave"}


class DeviceReads(TorchFunctionMode):
    """Counts the places a step would wait for the GPU, on any device.

    On a GPU a synchronisation is a read of a GPU tensor's values into Python (``.item()``,
    ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ...) or an operation whose output
    size depends on values (``nonzero``, boolean masks).  ``torch.cuda.set_sync_debug_mode``
    finds these only on CUDA; this mode sees the same calls through ``__torch_function__``
    on a CPU too.  There, though, every tensor is on the "device", including host-side ones
    that a GPU run keeps on the CPU and may read freely: the seeded random draws (the data
    order, flips) and the step counters of torch's optimizers.  So the mode tracks host
    tensors as a GPU run would place them: made by a factory without a ``device=`` (on a
    GPU run too, they are CPU tensors), or computed from host tensors only.  Every other
    tensor, among them all that existed before the mode started (weights, cached latents),
    counts as a device tensor, and reading one counts.  ``.to()`` is not counted on a CPU,
    where moving a tensor to the device and to the host are the same call.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.reads: list[str] = []
        self._host: set[int] = set()
        self._keep: list[torch.Tensor] = []  # host tensors stay alive, so that their ids stay theirs

    def _is_device(self, tensor: torch.Tensor) -> bool:
        if self.device.type != "cpu":
            return tensor.device.type != "cpu"
        return id(tensor) not in self._host

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if (name in _READS or name in _DATA_DEPENDENT) and tensors and self._is_device(tensors[0]):
            self.reads.append(name)
        if name in ("to", "copy_") and self.device.type != "cpu" and tensors:
            target = tensors[-1].device if name == "copy_" else None
            moves_to_host = "cpu" in str(args[1:]) + str(kwargs) or (target is not None and target.type == "cpu")
            if moves_to_host and tensors[0].device.type != "cpu":
                self.reads.append(name)
        result = func(*args, **kwargs)
        explicit_device = kwargs.get("device") not in (None, "cpu", torch.device("cpu"))
        host = not explicit_device and all(id(t) in self._host for t in tensors)
        if host:
            for out in tree_flatten(result)[0]:
                if isinstance(out, torch.Tensor):
                    self._host.add(id(out))
                    self._keep.append(out)
        return result


def test_the_read_counter_tells_device_reads_from_host_reads() -> None:
    """The counter is worth its zeros: it counts a loss read back, and not a host draw."""
    weight = torch.ones(3, requires_grad=True)
    with DeviceReads(torch.device("cpu")) as counter:
        order = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
        flips = (torch.rand(2, generator=torch.Generator().manual_seed(1)) < 0.5).tolist()
        assert counter.reads == []
        loss = (weight * 2).sum()
        float(loss.detach())
        _ = loss.item() > 0, bool(loss > 0), weight.tolist()
    assert len(order) == 5 and len(flips) == 2
    assert counter.reads == ["__float__", "item", "__bool__", "tolist"]


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit"])
def test_a_fast_path_step_reads_nothing_back_from_the_device(
    optimizer: str, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    """Steps only queue work; the losses are read in one go when a report is due (here: at
    the checkpoint and the last step, with an event interval longer than the run)."""
    from finetune_trainer.job import load_job

    spec = base_spec(
        tiny_model,
        photos,
        tmp_path / "out",
        maxSteps=STEPS,
        batchSize=2,
        gradientAccumulationSteps=2,
        optimizer=optimizer,
        snrGamma=5.0,
        noiseOffset=0.05,
    )
    spec["dataset"]["randomFlip"] = True
    spec["checkpoints"] = {"everySteps": 3}
    job = load_job(manifest(tmp_path / "job.yaml", **spec))
    recipe = train.DreamBoothRecipe(job, reporter=ProgressReporter(job="reads", interval_s=3600))
    counter = DeviceReads(torch.device("cpu"))
    per_step: list[int] = []
    per_report: list[int] = []

    def counted(real: Callable[[], Any], into: list[int]) -> Callable[[], Any]:
        def call() -> Any:
            before = len(counter.reads)
            result = real()
            into.append(len(counter.reads) - before)
            return result

        return call

    try:
        recipe.setup()
        recipe.train_step = counted(recipe.train_step, per_step)  # type: ignore[method-assign]
        recipe.report_losses = counted(recipe.report_losses, per_report)  # type: ignore[method-assign]
        with counter:
            recipe.train()
    finally:
        recipe.cleanup()
    assert recipe.settings.optimizer == optimizer
    assert per_step == [0] * STEPS
    # One read per report (the losses since the last one), and no read anywhere else.
    assert per_report == [1, 1]
    assert len(counter.reads) == 2
    # What was read back is every step's loss, in order.
    assert [h[0] for h in recipe.history] == list(range(1, STEPS + 1))
    assert all(numpy.isfinite(h[1]) and h[1] > 0 for h in recipe.history)


# --- a compiled UNet --------------------------------------------------------------------------------


@pytest.mark.skipif(not job_module.compiler_present(cuda=False), reason="torch.compile needs a C++ compiler here")
def test_a_compiled_unet_trains_like_the_eager_one(
    cached: tuple[Run, int], tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile: true`` on a CPU: the compile is a stage of its own with its time reported,
    checkpoints keep the weights' names, and the losses are the eager run's.

    The slow one of these tests.  It compiles with the ``aot_eager`` backend: the same
    TorchDynamo capture and AOTAutograd forward/backward graphs that inductor would turn
    into code, run without generating it.  Inductor's C++ build of the tiny UNet takes about
    a minute on a 2-core machine, for code that a GPU run (Triton) would not use anyway.
    """
    from torch._dynamo.utils import counters

    monkeypatch.setattr(train, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    captured_before = counters["stats"]["unique_graphs"]
    compiled = _run(tmp_path, "compiled", plain_spec(tiny_model, photos, tmp_path / "out", compile=True))
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > captured_before

    settings = compiled.summary["settings"]
    assert settings["compile"] == "true"
    assert float(settings["compile_seconds"]) > 0
    stages = [e["stage"] for e in compiled.events()]
    assert stages.index("compiling") < stages.index("training")
    first_training = next(e for e in compiled.events() if e["stage"] == "training")
    assert "compiling the UNet and the first step took" in first_training["message"]

    eager, _ = cached
    ckpt = Path("checkpoints") / f"checkpoint-{STEPS:06d}" / "model.safetensors"
    assert load_file(str(compiled.output / ckpt)).keys() == load_file(str(eager.output / ckpt)).keys()
    numpy.testing.assert_allclose(loss_history(compiled), loss_history(eager), rtol=1e-4)


# --- channels_last ------------------------------------------------------------------------------------


def test_channels_last_weights_checkpoint_resume_and_export(
    cached: tuple[Run, int], tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPU runs keep the UNet in channels_last, a layout safetensors does not write.  Forced
    on here: it trains as the default layout does, its checkpoints save and a resume loads
    them back into it, and the exports load."""
    real = train.resolve_settings

    def channels_last(*args: Any, **kwargs: Any) -> Any:
        settings, warnings = real(*args, **kwargs)
        return dataclasses.replace(settings, channels_last=True), warnings

    monkeypatch.setattr(train, "resolve_settings", channels_last)
    spec = plain_spec(tiny_model, photos, tmp_path / "out")
    spec["checkpoints"] = {"everySteps": 3, "keepLast": 2}
    first = _run(tmp_path, "nhwc", spec)
    assert first.summary["settings"]["channels_last"] == "true"
    eager, _ = cached
    numpy.testing.assert_allclose(loss_history(first), loss_history(eager), rtol=1e-4)

    final = first.output / "checkpoints" / f"checkpoint-{STEPS:06d}"
    weights = load_file(str(final / "model.safetensors"))
    shutil.rmtree(final)
    (first.output / "manifest.json").unlink()
    resumed = _run(tmp_path, "nhwc", spec)
    assert next(e for e in resumed.events() if e["stage"] == "training")["message"].startswith(
        f"training from step 3 to {STEPS}"
    )
    again = load_file(str(final / "model.safetensors"))
    for key, value in weights.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)

    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(first.output / "diffusers", subfolder="unet")
    assert sum(p.numel() for p in exported.parameters()) == sum(v.numel() for v in weights.values())


def test_out_of_memory_wrapped_by_the_compiler_still_ends_with_its_own_reason(
    tiny_model: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile reports a failure inside a compiled step as an error of its own, with the
    GPU's out-of-memory error as its cause: still exit 3 with the settings that fit, not a retry."""

    def compiled_out_of_memory(self: Any, micro_batch: int) -> Any:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("backend='inductor' raised: OutOfMemoryError") from exc

    monkeypatch.setattr(train.DreamBoothRecipe, "loss", compiled_out_of_memory)
    spec = base_spec(tiny_model, photos, tmp_path / "out", gradientCheckpointing=False)
    run = run_cli(manifest(tmp_path / "job.yaml", **spec), tmp_path / "out", tmp_path / "termination-log")
    assert run.code == ExitCode.OUT_OF_MEMORY
    assert run.summary["reason"] == "OutOfMemory"
    assert "spec.training.gradientCheckpointing: true" in run.summary["message"]
