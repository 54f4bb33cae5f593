"""The DreamBooth recipe: ``setup``, ``train``, ``save_checkpoint``, ``finish``, ``cleanup``.

Read top to bottom, it is diffusers' ``train_dreambooth.py`` (and, for method LoRA,
``train_dreambooth_lora.py``) with the data, checkpoint, sample and export parts moved to
their own modules.  What each setting costs:

- ``mixedPrecision`` fp16/bf16: about half the activation memory and faster on GPUs; the
  trained weights stay fp32 (the frozen VAE and text encoder run in the low precision).
- ``optimizer`` AdamW8bit: optimizer state in 8 bits, about 75% less of it (for an SD UNet
  about 5 GB less); the same algorithm as AdamW up to rounding.
- ``gradientCheckpointing``: recompute activations in the backward pass; much less memory,
  about 20% slower.
- ``attention`` xformers/sdpa: fused attention; less memory and faster than ``default``.
- ``trainTextEncoder``: better likeness for some subjects; about twice the memory, and the
  prompt embeddings can no longer be computed once.
- ``cacheLatents``: encode each image with the VAE once; exact (the latent distribution is
  cached and sampled each step) and faster.
- ``compile``: ``torch.compile`` of the UNet; minutes of compiling (the ``compiling`` stage)
  for faster steps.  Unset, it is on for CUDA runs long enough to repay it.
  ``compileMode: reduce-overhead`` adds CUDA graphs: less launch overhead at batch 1, more
  memory.
- prior preservation: a class image beside every instance image; twice the work per step.
- method LoRA: adapters on kohya's layers (or the attention projections only); the frozen
  denoiser runs in the mixed precision (Flux's optionally quantized, ``baseQuantization``) and
  only the adapters have gradients and optimizer state (a fraction of the memory; LoRA usually
  wants a learning rate near 1e-4 rather than DreamBooth's 2e-6).
- the objective is the family's (``families/``): DDPM noise with the epsilon or velocity target
  for the UNet families, flow matching for Flux; the recipe draws each slot's example, flip,
  latent sample and noise, and the family's objective its timestep, from the slot's generator.
- ``samples``: ``numInferenceSteps`` UNet passes per prompt at each sample step, on the main
  process, while the others wait.
- ``dataset.masks``: each photo's squared error weighed by its mask at the latents' size (kohya's
  masked loss); nothing more to compute than the mask's crop.
- ``training.ema``: a moving average of the trained weights (``ema.py``); one more copy of
  them (on the GPU, or in host memory with ``onCPU``, copied over at each update), exported and
  sampled in their place where asked.
- a person's requests (``finetune.dev/save-now``, ``sample-now``, ``stop-now``, in the reply to a
  progress report) are acted on at the next step boundary: nothing is asked of the device for
  them until one comes (with several processes, rank 0 passes them on every 10 steps).

Randomness (data order, crops, flips, noise, timesteps) comes from the seed and the position
in the run, so a run resumed from a checkpoint computes what the uninterrupted run would.

The fast path, on where it does not change what is computed (each choice is in the settings
of every progress event and of the summary):

- the VAE's latents (per image and flip) and the frozen text encoder's prompt embeddings are
  computed once and kept on the device;
- nothing is read back from the device in a step: the losses stay there until a progress
  event is due (every few seconds), a sample or a checkpoint, and are then read in one go,
  so the host queues the next step while the GPU still runs this one; random draws come
  from seeded CPU generators into pinned memory, whose copy to the GPU does not wait;
- on a GPU: AdamW as one fused kernel, the UNet in channels_last (not with bitsandbytes,
  which makes parameters contiguous at every step), cuDNN picking its fastest kernels;
- with ``mixedPrecision: fp16`` on a GPU with bf16: bf16, which needs no loss scaling (and
  none of its host synchronisation); it rounds differently, so ``preferBf16: false`` keeps
  fp16, and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api import contract, rules
from finetune_api.v1alpha1 import EvaluationStatus, FineTuneJob, Method, Samples, Stage
from finetune_trainer import (
    buckets,
    captions,
    checkpoints,
    class_images,
    data,
    ema,
    evaluation,
    export,
    families,
    gpu_load,
    layouts,
    lora,
    outputs,
    ownership,
    pictures,
    prompt_cache,
    samples,
    storage,
    textual_inversion,
)
from finetune_trainer.buckets import Bucket
from finetune_trainer.errors import BadInput, OutOfMemory
from finetune_trainer.job import (
    Device,
    Settings,
    caching_batch,
    detect_device,
    memory_check,
    process_group_timeout,
    resolve_settings,
    total_steps,
    trains_text_encoder,
)
from finetune_trainer.model import load_base_model, locate_uri
from finetune_trainer.report import ProgressReporter

log = logging.getLogger("finetune_trainer")

CHECKPOINTS_DIR = "checkpoints"
# spec.evaluation.holdOut: noise and timestep draws per held-out photo at every checkpoint.
HOLD_OUT_DRAWS = 4
# The EMA's samples (spec.training.ema.samples): under samples/, and their contact sheet.
EMA_SAMPLES_DIR = "ema"
EMA_SAMPLES_FILE = "samples-ema.png"
# With several processes, how often (in steps) they look for a person's request together.
REQUEST_EVERY_STEPS = 10
# What torch.compile builds with.  Inductor is the one that makes steps faster; tests on a
# CPU may use a cheaper backend that traces the same graphs without generating code.
COMPILE_BACKEND = "inductor"


def cache_dir() -> Path:
    """Downloads (remote models and images): ``FINETUNE_CACHE_DIR``, else the user's cache."""
    return Path(os.environ.get(contract.ENV_CACHE_DIR) or Path.home() / ".cache" / "finetune-trainer")


@dataclass
class PendingStep:
    """A finished optimizer step whose losses (device tensors, one per micro-batch) are not
    read back yet."""

    step: int
    losses: list[Any]
    learning_rate: float
    at: float  # time.monotonic() when the step was queued


@dataclass
class RunResult:
    step: int
    total_steps: int
    output: str  # the local folder, or the object-store URI
    files: list[Any]
    samples: list[str]
    stopped_early: bool = False  # stopped on request (finetune.dev/stop-now) before total_steps


class DreamBoothRecipe:
    """DreamBooth fine-tuning of a Stable Diffusion UNet (and optionally its text encoder),
    in full (method DreamBooth) or through LoRA adapters (method LoRA)."""

    def __init__(self, job: FineTuneJob, *, reporter: ProgressReporter, device: Device | None = None) -> None:
        self.job = job
        self.spec = job.spec
        self.reporter = reporter
        self.device_info = device or detect_device(job.spec)
        self.store = storage.ObjectStore.for_spec(self.spec)
        self.out = outputs.Output(self.spec.output.uri, cache_dir=cache_dir(), store=self.store)
        self.output = self.out.local
        self.checkpoint_dir = self.output / CHECKPOINTS_DIR
        self.samples_dir = self.output / samples.SAMPLES_DIR
        self.lora = self.spec.method == Method.LORA
        # Textual Inversion: the new word's rows of the text encoders' tables (set up with the models).
        self.learned: textual_inversion.Learned | None = None
        self.family = families.family_of(self.spec.base_model.type)
        self.trains_text_encoder = trains_text_encoder(self.spec)
        # LoRA: adapters on the text encoders (pivotal tuning alone trains their tables, not adapters).
        self.text_adapters = self.lora and self.spec.lora.train_text_encoder
        # Pivotal tuning's newTokens.trainFraction: the step from which the word stays as it is.
        self.word_frozen_at: int | None = None
        self.step = 0
        self.pending: list[PendingStep] = []
        self.compiled_step_done = False
        self.total_steps = 0
        self.history: list[tuple[int, float, float]] = []  # (step, loss, learning rate)
        self.sampler: samples.SampleRenderer | None = None
        # The moving average of the trained weights (spec.training.ema) and its samples' renderer.
        self.ema: ema.MovingAverage | None = None
        self.ema_sampler: samples.SampleRenderer | None = None
        # spec.evaluation: the scoring models (main process) and the renderers of its prompts, one per seed.
        self.scorer: evaluation.Scorer | None = None
        self.eval_renderers: list[samples.SampleRenderer] = []
        self._sample_failure_warned = False
        self._evaluation_seconds: float | None = None
        self.stopped_early = False
        # Each distinct prompt's token ids and (while the text encoders are frozen) conditioning.
        self.token_cache: dict[str, list[Any]] = {}
        # Masked loss with the latent cache (each photo's crop fixed): each (photo, size, crop,
        # flip)'s loss weights, made once and kept on the device.
        self.mask_rows: dict[tuple[int, Bucket, tuple[int, int], bool], Any] = {}
        self.prompt_cache = prompt_cache.PromptCache(device="cpu")  # on the training device from setup()
        # The text encoders have left the GPU (and host memory): every prompt is in the cache.
        self.encoders_released = False
        self.settings: Settings
        self.accelerator: Any = None
        self.identity = ownership.Identity.of(job)
        self.claim = ownership.Claim(self.out, self.identity, overwrite=self.spec.output.overwrite)

    # --- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        from datetime import timedelta

        import torch
        from accelerate import Accelerator
        from accelerate.utils import (
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
            ProjectConfiguration,
            set_seed,
        )

        spec, training = self.spec, self.spec.training
        self.settings, warnings = resolve_settings(spec, self.device_info)
        barrier_timeout = process_group_timeout(spec, remote_output=self.out.remote is not None)
        handlers: list[Any] = [InitProcessGroupKwargs(timeout=timedelta(seconds=barrier_timeout))]
        if self.trains_text_encoder:
            # A trained text encoder has parameters no step uses (SDXL's first encoder gives its
            # second-to-last layer, so its last layer never gets a gradient): DDP must be told,
            # or it waits for those gradients and stops at the second step (diffusers' SDXL and
            # Flux scripts pass the same).
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        self.accelerator = Accelerator(
            mixed_precision=self.settings.mixed_precision,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            cpu=self.device_info.type == "cpu",
            project_config=ProjectConfiguration(project_dir=str(self.output), automatic_checkpoint_naming=False),
            kwargs_handlers=handlers,
        )
        accelerator = self.accelerator
        self.prompt_cache = prompt_cache.PromptCache(device=accelerator.device)
        self.reporter.enabled = accelerator.is_main_process
        if self.device_info.type == "cuda":
            self.reporter.peak_memory = lambda: int(torch.cuda.max_memory_allocated())
            if accelerator.is_main_process:
                index = torch.cuda.current_device()
                uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
                read = gpu_load.nvml_reader(index, f"GPU-{uuid}" if uuid else None)
                if read is not None:
                    self.reporter.gpu_load = read
        self.barrier_timeout = barrier_timeout
        self._report_settings()
        for warning in warnings:
            self.reporter.warn(warning)
        if self.device_info.memory_bytes:
            # Before minutes of downloads: a run the GPU cannot hold is refused now.
            problem = memory_check(
                # With the quantization in effect (a fallback trains unquantized).
                spec.model_copy(
                    update={
                        "training": training.model_copy(update={"base_quantization": self.settings.base_quantization})
                    }
                ),
                self.family,
                mixed_precision=self.settings.mixed_precision,
                optimizer=self.settings.optimizer,
                gpu_bytes=self.device_info.memory_bytes,
            )
            if problem is not None:
                raise OutOfMemory(problem)
        set_seed(training.seed)
        self.reporter.set_stage(Stage.DOWNLOADING, message=f"reading the base model {spec.base_model.uri}")
        if accelerator.is_main_process:
            # Before anything is written: this run holds the folder, and what is there is its own.
            self.claim.acquire()
            self.claim.check_owner()
            self.output.mkdir(parents=True, exist_ok=True)
            generated = self.output / class_images.OUTPUT_SUBDIR
            for folder in (
                self.output,
                self.checkpoint_dir,
                self.samples_dir,
                self.samples_dir / EMA_SAMPLES_DIR,
                generated,
            ):
                for path in storage.remove_temporaries(folder):
                    log.info(f"removed {path}, left by an interrupted run", extra={"event": "cleanup"})
            # An object-store output: what earlier attempts uploaded comes back first.
            self.out.pull()
        accelerator.wait_for_everyone()

        self.base = load_base_model(
            spec.base_model, cache_dir=cache_dir(), store=self.store, options=self._load_options()
        )
        self.found = self._read_dataset()
        self.held_out = self._hold_out()
        self.instance = self.found.examples
        self.class_examples: list[data.Example] = []
        if spec.dataset.prior_preservation:
            for index, concept in enumerate(self.found.concepts):
                concept.class_examples = self._class_examples(concept, index)
                self.class_examples += concept.class_examples
        self.reporter.dataset = self.found.status()
        self.reporter.emit(message=self.found.describe())

        self.total_steps = total_steps(
            spec, len(self.instance), num_processes=accelerator.num_processes, seen_per_epoch=sum(self.found.repeats)
        )
        self.reporter.total_steps = self.total_steps
        if training.ema is not None and training.ema.start_step > self.total_steps:
            # The CRD refuses it where maxSteps is set; stepsPerImage's steps are known only now.
            raise BadInput(
                f"{rules.EMA_AFTER_THE_END} (this run has {self.total_steps})", field="spec.training.ema.startStep"
            )
        # Now that the length of the run is known: whether compiling the UNet pays.
        self.settings, warnings = resolve_settings(spec, self.device_info, total_steps=self.total_steps)
        self._report_settings()
        for warning in warnings:
            self.reporter.warn(warning)
        self.fingerprint = checkpoints.training_fingerprint(spec)
        if accelerator.is_main_process:
            # The images are read: the folder was trained on them, or it becomes this run's.
            self.claim.settle(dataset=data.dataset_fingerprint(self.instance, self.class_examples))
            if self.claim.replaced:
                self.reporter.warn(
                    f"spec.output.overwrite: what {self.out.location()} held was moved into {self.claim.replaced}/ "
                    "inside it; this run starts from step 0"
                )
        accelerator.wait_for_everyone()
        resume = checkpoints.newest(self.checkpoint_dir)
        if resume is not None:
            checkpoints.check_compatible(resume, fingerprint=self.fingerprint)
            self._report_checkpoints()

        self._configure_models()
        self._build_optimizer()
        if training.ema is not None:
            self.ema = ema.MovingAverage(self.trainable, training.ema, device=accelerator.device)
            # Saved with every checkpoint and loaded with it (accelerate's custom state).
            accelerator.register_for_checkpointing(self.ema)
        self._prepare_data()
        self.sampler = self._sampler(self.samples_dir)
        self._set_up_evaluation()
        if self.ema is not None and self.ema.settings.samples:
            self.ema_sampler = self._sampler(self.samples_dir / EMA_SAMPLES_DIR)
        self._report_samples()
        if resume is not None:
            checkpoints.load(accelerator, resume)
            self.step = resume.step
            self.reporter.step = self.step
            self.history = [(int(s), float(v), float(r)) for s, v, r in resume.state.get("loss_history", [])]
            log.info(f"resuming from {resume.path} at step {resume.step}", extra={"event": "resume"})

    def _sampler(self, folder: Path, settings: Samples | None = None) -> samples.SampleRenderer:
        return samples.SampleRenderer(
            settings or self.spec.samples,
            resolution=self.settings.resolution,
            base=self.base,
            folder=folder,
            device=self.accelerator.device,
            dtype=self.weight_dtype,
            prompt_inputs=self._sample_inputs if self.family.text_encoders_leave_gpu else None,
        )

    def _hold_out(self) -> list[data.Example]:
        """spec.evaluation.holdOut: photos taken out of training for the held-out loss, one at a
        time from the end of whichever concept has the most left (each keeps at least one)."""
        settings = self.spec.evaluation
        wanted = settings.hold_out if settings is not None else 0
        if not wanted:
            return []
        concepts = self.found.concepts
        spare = sum(len(c.examples) - 1 for c in concepts)
        if wanted > spare:
            raise BadInput(
                f"holdOut {wanted} would leave a concept without photos to train on: the dataset has "
                f"{len(self.found.examples)} photo(s) in {len(concepts)} concept(s); hold out at most {spare}",
                field="spec.evaluation.holdOut",
            )
        held: list[data.Example] = []
        for _ in range(wanted):
            largest = max(reversed(concepts), key=lambda c: len(c.examples))
            held.append(largest.examples.pop())
        log.info(
            f"held out of training for the held-out loss: {', '.join(e.path.name for e in held)}",
            extra={"event": "held-out"},
        )
        return held

    def _held_out_loss(self) -> float:
        """The denoising loss of the held-out photos at this step: each centre-cropped at its
        size, with the same noise and timesteps at every checkpoint (HOLD_OUT_DRAWS each)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        accelerator = self.accelerator
        device = accelerator.device
        unet = accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        was_training = unet.training
        unet.eval()
        losses: list[float] = []
        try:
            with torch.no_grad(), accelerator.autocast():
                for index, example in enumerate(self.held_out):
                    bucket = example.bucket
                    square, crop = data.crop_at(data.fit(example.pixels, bucket), bucket, center=True, flip=False)
                    pixels = square[None].to(device, dtype=self.vae_dtype)
                    latent = self.base.vae.encode(pixels).latent_dist.mean.float()
                    conditioning = self._conditioning([example.prompt])
                    ids = self.family.time_ids(
                        original_size=example.original_size, crop=crop, target=(bucket.height, bucket.width)
                    )
                    sizes = None
                    if ids is not None:
                        sizes = torch.tensor([ids], dtype=conditioning.hidden.dtype).to(device)
                    for draw in range(HOLD_OUT_DRAWS):
                        gen = data.generator(self.spec.training.seed, data.STREAM_HOLD_OUT, index, draw)
                        noise = torch.randn(latent.shape[1:], generator=gen)[None].to(device)
                        timestep = torch.tensor([self.objective.draw(gen, bucket)]).to(device)
                        predicted = self.objective.predict(
                            unet, latents=latent, noise=noise, timesteps=timestep, conditioning=conditioning,
                            time_ids=sizes,
                        )  # fmt: skip
                        error = F.mse_loss(predicted.prediction.float(), predicted.target.float())
                        if predicted.weights is not None:
                            error = error * predicted.weights.float().mean()
                        losses.append(float(error))
        finally:
            unet.train(was_training)
        return sum(losses) / len(losses)

    def _set_up_evaluation(self) -> None:
        """spec.evaluation: its prompts rendered with the samples' settings, one renderer per seed,
        into evaluation/seed-N/; the scoring models read once and the instance photos embedded
        (main process, which renders and scores)."""
        settings = self.spec.evaluation
        if settings is None or (settings.clip_model is None and settings.dino_model is None):
            return  # the held-out loss alone: nothing to render
        folder = self.output / evaluation.EVALUATION_DIR
        self.eval_renderers = [
            self._sampler(
                folder / f"seed-{i}",
                self.spec.samples.model_copy(
                    update={"prompts": list(settings.prompts), "seed": self.spec.samples.seed + i}
                ),
            )
            for i in range(settings.images_per_prompt)
        ]
        if not self.accelerator.is_main_process:
            return
        from PIL import Image, ImageOps

        started = time.monotonic()
        self.scorer = evaluation.Scorer(
            settings,
            locate=lambda uri, field: locate_uri(
                uri, field=field, patterns=evaluation.HUB_PATTERNS, cache_dir=cache_dir(), store=self.store
            ),
        )
        photos = []
        for example in self.instance:
            with Image.open(example.path) as image:
                photos.append(ImageOps.exif_transpose(image).convert("RGB"))
        self.scorer.set_reference(photos)
        log.info(
            f"read the scoring models and embedded {len(photos)} photos in {time.monotonic() - started:.1f} s",
            extra={"event": "evaluation-ready"},
        )

    def _evaluate(self) -> dict[str, float]:
        """Render the evaluation prompts at this step and score them (main process; {} elsewhere
        and without spec.evaluation).  With an exported EMA the average is what is scored."""
        if self.spec.evaluation is None or not self.accelerator.is_main_process:
            return {}
        started = time.monotonic()
        # With an exported EMA, the average is what is scored (in the trained weights' places).
        average = self.ema.swapped_in() if self.ema is not None and self.ema.settings.export else None
        with average or contextlib.nullcontext():
            scores = self._scored_images() if self.scorer is not None else {}
            if self.held_out:
                scores["holdOutLoss"] = round(self._held_out_loss(), 6)
        seconds = time.monotonic() - started
        log.info(f"scores at step {self.step}: {scores} ({seconds:.1f} s)", extra={"event": "evaluated"})
        self._evaluation_seconds = seconds
        return scores

    def _scored_images(self) -> dict[str, float]:
        """The evaluation prompts rendered at this step and scored by the scoring models."""
        import torch
        from PIL import Image

        assert self.scorer is not None
        accelerator = self.accelerator
        stage = self.reporter.stage
        prompts = list(self.scorer.settings.prompts)
        self.reporter.set_stage(
            Stage.EVALUATING, message=f"rendering and scoring {len(prompts) * len(self.eval_renderers)} images"
        )
        encoders = [None if self.encoders_released else accelerator.unwrap_model(e) for e in self.text_encoders]
        unet = accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        images, shown, paths = [], [], []
        for renderer in self.eval_renderers:
            renderer.render(self.step, unet=unet, text_encoders=encoders)
            for index, prompt in enumerate(prompts):
                path = renderer.folder / samples.sample_name(self.step, index)
                if path.is_file():
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                    shown.append(prompt)
                    paths.append(path)
        if self.device_info.type == "cuda":
            torch.cuda.empty_cache()  # the sampling's memory, before the scoring models come
        scores = self.scorer.score(images, shown, device=accelerator.device) if images else {}
        self._publish(paths, what="evaluation images")
        self.reporter.set_stage(stage, message=f"{len(images)} images at step {self.step} scored: {scores}")
        return scores

    def _scored(self) -> list[tuple[int, dict[str, float]]]:
        """Every complete checkpoint's scores, by step."""
        return [
            (c.step, dict(c.state.get("scores") or {})) for c in checkpoints.complete_checkpoints(self.checkpoint_dir)
        ]

    def _report_evaluation(self) -> None:
        settings = self.spec.evaluation
        if settings is None or not self.accelerator.is_main_process:
            return
        top = evaluation.best(self._scored(), settings)
        self.reporter.evaluation = EvaluationStatus(
            rule=evaluation.rule_text(settings),
            best_step=top[0] if top else None,
            best_scores=top[1] if top else {},
            seconds=round(self._evaluation_seconds, 1) if self._evaluation_seconds is not None else None,
        )

    def _load_options(self) -> families.LoadOptions:
        """How a family that reads its models in the run's precision reads them (Flux: the frozen
        transformer straight onto this process's device, quantized where asked)."""
        return families.LoadOptions(
            precision=self.settings.mixed_precision,
            quantization=self.settings.base_quantization,
            device=str(self.accelerator.device),
            scratch=str(cache_dir() / "converted"),
        )

    def _report_settings(self) -> None:
        self.reporter.settings = self.settings.as_report()
        if self.accelerator.num_processes > 1:
            self.reporter.settings["processes"] = str(self.accelerator.num_processes)
            self.reporter.settings["barrier_timeout_s"] = str(self.barrier_timeout)

    def size_for(self, height: int, width: int) -> Bucket:
        """The training size of a photo of this size: its aspect-ratio bucket, or the square."""
        return buckets.nearest(self.bucket_sizes, height=height, width=width)

    def _read_dataset(self) -> layouts.Found:
        dataset = self.spec.dataset
        resolution = self.settings.resolution
        if self.settings.buckets:
            low, high = buckets.limits(resolution, min_side=dataset.bucket_min_side, max_side=dataset.bucket_max_side)
            self.bucket_sizes = buckets.bucket_sizes(
                resolution, min_side=low, max_side=high, max_ratio=dataset.bucket_max_ratio
            )
        else:
            self.bucket_sizes = [buckets.square(resolution)]

        def fetch(uri: str, field: str) -> Path:
            folder = storage.fetch(uri, field=field, cache_dir=cache_dir(), store=self.store)
            assert folder is not None  # missing_ok is off: a missing folder is bad input
            return folder

        found = layouts.read(self.spec, fetch=fetch, size_for=self.size_for)
        for warning in found.warnings:
            self.reporter.warn(warning)
        # The tokenizer that reads the most of a prompt (CLIP's 75 tokens; Flux's T5 more).
        tokenizer, window = self.family.prompt_window(self.base.tokenizers)
        long = captions.too_long(found.examples, tokenizer, window=window)
        if long:
            self.reporter.warn(captions.too_long_warning(long, tokenizer, window=window))
        log.info(found.describe(), extra={"event": "dataset"})
        return found

    def _class_examples(self, concept: layouts.Concept, index: int) -> list[data.Example]:
        dataset = self.spec.dataset
        prompt = concept.class_prompt
        if prompt is None:
            raise BadInput(
                f"prior preservation needs a class prompt for {concept.name}: set its classPrompt",
                field=concept.class_field,
            )
        accelerator = self.accelerator
        user_dir: Path | None = None
        writable = False
        if isinstance(concept.class_images, Path):
            user_dir = concept.class_images  # kohya's regularisation folder: read, not written
        elif concept.class_images is not None:
            user_dir = storage.local_path(concept.class_images, field=concept.class_field)
            writable = user_dir is not None
            if user_dir is None:
                # An object store: read its images; what is missing is generated under the output.
                user_dir = storage.fetch(
                    concept.class_images,
                    field=concept.class_field,
                    cache_dir=cache_dir(),
                    store=self.store,
                    missing_ok=True,
                )
        generated_dir = self.output / class_images.OUTPUT_SUBDIR
        if len(self.found.concepts) > 1:
            generated_dir = generated_dir / f"{index:02d}-{storage.slug(prompt)}"
        folders, target, missing = class_images.plan_folders(
            dataset.num_class_images, generated_dir, user_dir=user_dir, user_writable=writable
        )
        if missing and target is not None:
            self.reporter.set_stage(
                Stage.CLASS_IMAGES, message=f"generating {missing} class images with the base model into {target}"
            )
            if accelerator.is_main_process:
                generated = class_images.generate(
                    self.base,
                    target,
                    count=missing,
                    prompt=prompt,
                    resolution=self.settings.resolution,
                    seed=self.spec.training.seed,
                    device=accelerator.device,
                    mixed_precision=self.settings.mixed_precision,
                    reporter=self.reporter,
                )
                if target.is_relative_to(self.output):
                    self.out.push(generated)  # so that a retry on another node reuses them
            accelerator.wait_for_everyone()
        else:
            log.info(
                f"reusing {dataset.num_class_images} class images from {', '.join(map(str, folders))}",
                extra={"event": "class-images-reused"},
            )
        examples: list[data.Example] = []
        for folder in folders:
            if not folder.is_dir():
                continue
            loaded = data.load_folder(
                folder,
                prompt=prompt,
                resolution=self.settings.resolution,
                field_name=concept.class_field,
                size_for=self.size_for,
            )
            if (warning := loaded.skipped_warning(concept.class_field)) is not None:
                self.reporter.warn(warning)
            for example in loaded.examples:
                example.concept = index
            examples.extend(loaded.examples)
        chosen = examples[: dataset.num_class_images]
        class_images.refuse_blank(chosen, folders=folders, field=concept.class_field)
        return chosen

    def _configure_models(self) -> None:
        import torch

        base = self.base
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.settings.mixed_precision, torch.float32
        )
        device = self.accelerator.device
        if self.settings.cudnn_benchmark:
            # Every step has the same shapes: the fastest convolution kernels, found once.
            torch.backends.cudnn.benchmark = True
        base.vae.requires_grad_(False)
        base.vae.eval()
        # The frozen parts never need fp32: running them in the low precision is what the
        # memory figures in the docs assume.  Except a VAE that overflows in fp16 (SDXL's).
        self.vae_dtype = self.weight_dtype
        if self.family.vae_overflows_in_fp16 and base.vae_source is None and self.weight_dtype != torch.float32:
            self.vae_dtype = torch.float32
            self.reporter.warn(
                f"spec.baseModel.vaeUri: the {self.family.name} VAE overflows in fp16 (black or NaN images), so it "
                f"runs in fp32 while the rest runs in {self.settings.mixed_precision} (more memory and time for "
                "encoding); set spec.baseModel.vaeUri to an fp16-safe VAE (such as the community's sdxl-vae-fp16-fix) "
                "to run it in the mixed precision"
            )
        base.vae.to(device, dtype=self.vae_dtype)
        encoders = base.text_encoders
        if self.family.text_encoders_leave_gpu:
            # Flux: the prompts are encoded before the transformer comes to the GPU, and where
            # nothing is left to encode the text encoders leave it (9.5 GB of T5-XXL in bf16).
            self._encode_prompts_first()
        if self.lora:
            # The whole base model is frozen; only the adapters (fp32) learn, and with pivotal
            # tuning the new word's rows of the text encoders' tables (the encoders stay fp32).
            new_tokens = self.spec.lora.new_tokens
            unet = base.denoiser()
            unet.requires_grad_(False)
            if base.quantized == "none":
                unet.to(device, dtype=self.weight_dtype)
            for encoder in encoders:
                encoder.requires_grad_(False)
                if self.encoders_released:
                    continue
                if self.family.text_encoders_leave_gpu:
                    # A family that loads in the run's precision has its encoders in theirs (T5
                    # never in fp16, whose range its activations exceed).
                    encoder.to(device)
                else:
                    encoder.to(device, dtype=torch.float32 if new_tokens else self.weight_dtype)
            if new_tokens is not None:
                self.learned = textual_inversion.add_word(
                    base.tokenizers, encoders, new_tokens, field="spec.training.lora.newTokens"
                )
            adapted = encoders if self.text_adapters else []
            lora.add_adapters(unet, adapted, self.spec.lora, family=self.family)
            if self.learned is not None:
                self.learned.learn(encoders)  # peft froze everything but its adapters
            lora.register_checkpoint_hooks(self.accelerator, self.learned)
        elif self.spec.method == Method.TEXTUAL_INVERSION and self.spec.textual_inversion is not None:
            # The base model frozen; the word's rows of each text encoder's table learn (the
            # encoders stay fp32: their tables are trained).
            base.unet.requires_grad_(False)
            base.unet.to(device, dtype=self.weight_dtype)
            self.learned = textual_inversion.add_word(base.tokenizers, encoders, self.spec.textual_inversion)
            for encoder in encoders:
                encoder.to(device)
            textual_inversion.register_checkpoint_hooks(self.accelerator, self.learned)
        else:
            base.unet.requires_grad_(True)
            for encoder in encoders:
                encoder.requires_grad_(self.trains_text_encoder)
                if not self.trains_text_encoder:
                    encoder.to(device, dtype=self.weight_dtype)
        base.unet.train()
        trained = self._trained_encoders()
        for encoder in encoders:
            encoder.train(any(encoder is t for t in trained))
        if self.settings.channels_last:
            # (Checkpoints still hold contiguous tensors: accelerate makes them so for
            # safetensors, and loading copies them back into this layout.)
            base.unet.to(memory_format=torch.channels_last)
        self.family.set_attention(base.unet, self.settings.attention)
        if self.settings.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if self.trains_text_encoder:
                for encoder in self._trained_encoders():
                    # transformers 5 renamed it; older versions only have the first name.
                    enable = getattr(encoder, "activation_checkpointing_enable", None)
                    (enable or encoder.gradient_checkpointing_enable)()
        self.objective = self.family.objective(
            base,
            self.spec.training,
            prediction_type=self.settings.prediction_type,
            channels_last=self.settings.channels_last,
            device=device,
        )

    def _trained_encoders(self) -> list[Any]:
        """The text encoders this run trains (LoRA on Flux: CLIP alone)."""
        if not self.trains_text_encoder:
            return []
        return lora.adapted(self.family, self.base.text_encoders) if self.lora else list(self.base.text_encoders)

    def _encode_prompts_first(self) -> None:
        """Every prompt the run can see, and the sample prompts, encoded now with the text
        encoders alone on the GPU; where no new prompt can come (no trained text encoder, no
        shuffled captions) and the cache holds them all, the encoders then leave the GPU and
        host memory (to the meta device: anything that still used them would fail loudly
        rather than fall back to minutes of encoding on a CPU)."""
        import torch

        prompts = self._prompts()
        if self.trains_text_encoder or self.spec.dataset.shuffle_caption:
            return
        device = self.accelerator.device
        self.reporter.set_stage(Stage.CACHING, message=f"encoding {len(prompts)} prompts once")
        for encoder in self.base.text_encoders:
            encoder.requires_grad_(False)
            encoder.eval()
            encoder.to(device)
        extra = list(self.spec.samples.prompts)
        self._cache_prompts(self.base.text_encoders, extra=extra)
        if not all(p in self.prompt_cache for p in [*prompts, *extra]):
            log.info(
                f"{len(prompts) + len(extra)} prompts are more than the prompt cache holds; the text encoders stay",
                extra={"event": "prompt-cache-full"},
            )
            return
        for encoder in self.base.text_encoders:
            encoder.to("meta")
        self.encoders_released = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info(
            f"encoded {len(self.prompt_cache)} prompts; the text encoders left the GPU",
            extra={"event": "text-encoders-released"},
        )

    def _build_optimizer(self) -> None:
        import itertools

        import torch
        from diffusers.optimization import get_scheduler

        training = self.spec.training
        accelerator = self.accelerator
        trained = self._trained_encoders()
        models = [self.base.unet, *trained]
        # Everything of a DreamBooth run; only the adapters of a LoRA run.
        params = [p for p in itertools.chain(*(m.parameters() for m in models)) if p.requires_grad]
        optimizer: Any
        options: dict[str, Any] = {
            "lr": self.settings.learning_rate,
            "betas": (training.adam_beta1, training.adam_beta2),
            "weight_decay": training.adam_weight_decay,
            "eps": training.adam_epsilon,
        }
        if self.settings.optimizer == "AdamW8bit":
            import bitsandbytes

            optimizer = bitsandbytes.optim.AdamW8bit(params, **options)
        else:
            # fused: one kernel for every parameter (and no host synchronisation with fp16's
            # loss scaling); left to torch's default elsewhere, so CPU runs stay as they were.
            fused: dict[str, Any] = {"fused": True} if self.settings.fused_optimizer else {}
            optimizer = torch.optim.AdamW(params, **options, **fused)
        # The prepared scheduler steps once per process for every optimizer step, as in
        # diffusers' examples; the counts are scaled to match.
        scheduler = get_scheduler(
            str(training.lr_scheduler),
            optimizer=optimizer,
            num_warmup_steps=training.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
        )
        if self.learned is not None and not self.lora:
            # Only the text encoders learn: the frozen UNet is not handed to accelerate (a
            # model without a trainable parameter cannot be wrapped for several processes).
            *prepared, self.optimizer, self.lr_scheduler = accelerator.prepare(*trained, optimizer, scheduler)
            self.unet = self.base.unet
            swap = {id(t): p for t, p in zip(trained, prepared, strict=True)}
            self.text_encoders = [swap.get(id(e), e) for e in self.base.text_encoders]
        elif self.trains_text_encoder:
            self.unet, *prepared, self.optimizer, self.lr_scheduler = accelerator.prepare(
                self.base.unet, *trained, optimizer, scheduler
            )
            # The prepared (trained) encoders in their places, the frozen ones as they are.
            swap = {id(t): p for t, p in zip(trained, prepared, strict=True)}
            self.text_encoders = [swap.get(id(e), e) for e in self.base.text_encoders]
        else:
            self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(self.base.unet, optimizer, scheduler)
            self.text_encoders = list(self.base.text_encoders)
        self.trainable = params
        self.models = [self.unet, *(swap[id(t)] for t in trained)] if self.trains_text_encoder else [self.unet]
        if self.learned is not None and not self.lora:
            self.models = [swap[id(t)] for t in trained]
        if self.settings.compile:
            import torch

            mode: dict[str, Any] = {}
            if self.settings.compile_mode == "reduce-overhead":
                mode = {"mode": "reduce-overhead"}
            if self.settings.buckets:
                # One graph per bucket (static shapes, each compiled the first time it comes up;
                # with reduce-overhead one CUDA graph each), rather than dynamic shapes, which
                # are slower: enough room in dynamo's cache for every bucket.
                sizes = len({e.bucket for e in self.instance})
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, sizes + 8)
                mode["dynamic"] = False
            # Compiled lazily, in the first step (the "compiling" stage); checkpoints, samples
            # and exports use the module inside, so its weights keep their names.
            self.unet = torch.compile(self.unet, backend=COMPILE_BACKEND, **mode)

    def _prepare_data(self) -> None:
        dataset, training = self.spec.dataset, self.spec.training
        sizes = sorted({e.bucket for e in self.instance})
        self.instance_order = data.ExampleOrder(
            len(self.instance),
            training.seed,
            data.STREAM_ORDER,
            repeats=tuple(self.found.repeats),
            # Buckets: each process's share of a micro-batch from one bucket (one tensor).
            groups=tuple(sizes.index(e.bucket) for e in self.instance) if self.settings.buckets else None,
            group_size=training.batch_size,
        )
        # Each concept's class images, in an order of their own; a slot's class image comes
        # from the concept of its photo.
        self.class_pools: dict[int, list[int]] = {}
        for index, example in enumerate(self.class_examples):
            self.class_pools.setdefault(example.concept, []).append(index)
        self.class_orders = {
            concept: data.ExampleOrder(len(pool), training.seed, data.STREAM_CLASS_ORDER + 100 * concept)
            for concept, pool in self.class_pools.items()
        }
        self.latents: list[data.LatentCache] = []
        needs_cache = self.settings.cache_latents or not self.trains_text_encoder
        if needs_cache:
            self.reporter.set_stage(Stage.CACHING, message="encoding images and prompts once")
        if self.settings.cache_latents:
            shaped = all(tuple(e.pixels.shape[1:]) == (e.bucket.height, e.bucket.width) for e in self.instance)
            if not dataset.center_crop and not shaped:
                self.reporter.warn(
                    "spec.training.cacheLatents: some images do not have their training size's shape and "
                    "spec.dataset.centerCrop is false; their random crop is drawn once and cached instead of anew "
                    "each epoch (set centerCrop: true, or cacheLatents: false for a new crop every epoch)"
                )
            batch = self._caching_batch()
            for stream, examples in enumerate((self.instance, self.class_examples)):
                cache = data.LatentCache(
                    self.base.vae,
                    examples,
                    center_crop=dataset.center_crop,
                    random_flip=dataset.random_flip,
                    seed=training.seed,
                    stream=stream,
                    device=self.accelerator.device,
                    dtype=self.vae_dtype,
                    batch_size=batch,
                )
                # Photos at their own size now; class images at the sizes of the photos beside
                # them, as they come (each size once).
                cache.fill([(i, e.bucket) for i, e in enumerate(examples) if stream == 0 or e.bucket in sizes])
                self.latents.append(cache)
        self._cache_prompts(self.text_encoders)

    def _caching_batch(self) -> int:
        """Examples per VAE pass while caching latents: what the GPU's free memory holds now,
        the models loaded (an SDXL picture at 1024 px in fp32 takes some 1.5 GiB to encode)."""
        import torch

        free: int | None = None
        device = self.accelerator.device
        if device.type == "cuda":
            free = int(torch.cuda.mem_get_info(device)[0])
        return caching_batch(
            self.settings.resolution,
            dtype_bytes=torch.empty((), dtype=self.vae_dtype).element_size(),
            variants=2 if self.spec.dataset.random_flip else 1,
            free_bytes=free,
        )

    def _prompts(self) -> list[str]:
        """Every prompt a step can see without caption shuffling."""
        prompts = {e.prompt for e in (*self.instance, *self.class_examples)}
        if self.spec.dataset.caption_dropout:
            prompts.add("")
        return sorted(prompts)

    def _cache_prompts(self, encoders: list[Any], *, extra: list[str] | None = None) -> None:
        """Token ids of every prompt, and while the text encoders are frozen their conditioning
        (what is cached already is kept; with shuffled captions a step's prompt is new, and
        only the sample prompts are kept)."""
        import torch

        # Token ids live on the device too: a trained text encoder reads them every step.
        for prompt in self._prompts():
            if prompt not in self.token_cache:
                self.token_cache[prompt] = self._tokens(prompt)
        if self.trains_text_encoder:
            return
        training = [] if self.spec.dataset.shuffle_caption else self._prompts()
        with torch.no_grad():
            for prompt in [*training, *(extra or [])]:
                if prompt not in self.prompt_cache and not self.prompt_cache.put(
                    prompt, self._encode_one(prompt, encoders)
                ):
                    return  # full: the rest are encoded when they come

    def _tokens(self, prompt: str) -> list[Any]:
        if self.learned is not None:
            prompt = textual_inversion.expand(prompt, self.learned.settings)
        return [ids[0].to(self.accelerator.device) for ids in self.family.tokenize(self.base.tokenizers, [prompt])]

    def _encode_one(self, prompt: str, encoders: list[Any] | None = None) -> families.Conditioning:
        if self.encoders_released:
            raise RuntimeError(f"the text encoders have left, and the prompt {prompt!r} was not encoded before")
        ids = [i[None] for i in self.token_cache.setdefault(prompt, self._tokens(prompt))]
        return self.family.encode(encoders if encoders is not None else self.text_encoders, ids).one(0)

    def _sample_inputs(self, prompt: str) -> dict[str, Any]:
        """A sample prompt's pipeline arguments from its embeddings: cached (frozen text
        encoders), or encoded now by the encoders being trained."""
        import torch

        cached = self.prompt_cache.get(prompt)
        if cached is None:
            with torch.no_grad():
                cached = self._encode_one(prompt)
        return self.family.prompt_inputs(cached)

    def _conditioning(self, prompts: list[str]) -> families.Conditioning:
        """The text conditioning of a micro-batch: encoded now when the text encoders train,
        else from the cache (a prompt not kept there, a shuffled caption, is encoded now; kept
        where captions are not shuffled and the cache has room)."""
        import torch

        if self.trains_text_encoder:
            for prompt in prompts:
                if prompt not in self.token_cache:
                    self.token_cache[prompt] = self._tokens(prompt)
            ids = [torch.stack([self.token_cache[p][k] for p in prompts]) for k in range(len(self.text_encoders))]
            return self.family.encode(self.text_encoders, ids)
        rows = []
        for prompt in prompts:
            cached = self.prompt_cache.get(prompt)
            if cached is None:
                with torch.no_grad():
                    cached = self._encode_one(prompt)
                if not self.spec.dataset.shuffle_caption:
                    self.prompt_cache.put(prompt, cached)
            rows.append(cached)
        return families.stack(rows)

    # --- train ----------------------------------------------------------------------------------

    def train(self) -> None:
        every = self.spec.checkpoints.every_steps
        if self.step >= self.total_steps:
            log.info("training already complete in the newest checkpoint", extra={"event": "resume-complete"})
            return
        span = f"training from step {self.step} to {self.total_steps}"
        if self.settings.compile and not self.compiled_step_done:
            self.reporter.set_stage(
                Stage.COMPILING, message=f"compiling the UNet (torch.compile) in the first step; {span}"
            )
        else:
            self.reporter.set_stage(Stage.TRAINING, message=span)
        while self.step < self.total_steps:
            self._maybe_freeze_the_word()
            losses = self.train_step() if self.compiled_step_done or not self.settings.compile else self._compile()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            learning_rate = float(self.lr_scheduler.get_last_lr()[0])
            self.pending.append(PendingStep(self.step, losses, learning_rate, time.monotonic()))
            sample_due = self._sample_due()
            checkpoint_due = bool(every) and self.step % every == 0
            if self.step >= self.total_steps or sample_due or checkpoint_due or self.reporter.due():
                self.report_losses()
            if self.step < self.total_steps:
                # Samples before the checkpoint: a run resumed from it has them already.
                self.maybe_sample()
                if checkpoint_due:
                    self.save_checkpoint()
                if self._act_on_requests():
                    break

    def _maybe_freeze_the_word(self) -> None:
        """Pivotal tuning: after newTokens.trainFraction of the run the word stays as it is and
        only the adapters learn on (diffusers' advanced script's --train_text_encoder_ti_frac)."""
        new_tokens = self.spec.lora.new_tokens if self.lora else None
        if self.learned is None or new_tokens is None or self.learned.frozen:
            return
        if self.word_frozen_at is None:
            self.word_frozen_at = math.ceil(self.total_steps * new_tokens.train_fraction)
        if self.step >= self.word_frozen_at:
            self.learned.freeze(self.base.text_encoders)
            log.info(
                f"the new word's vectors stay as they are from step {self.step} (newTokens.trainFraction "
                f"{new_tokens.train_fraction:g}); the adapters learn on",
                extra={"event": "word-frozen"},
            )

    def _requests(self) -> dict[str, str]:
        """What a person asked of this run (contract.REQUEST_ANNOTATIONS) and it has not done:
        read at every step on one process; with several, every REQUEST_EVERY_STEPS steps and
        passed from the main process to all (a checkpoint is saved by every process)."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return self.reporter.requests()
        if self.step % REQUEST_EVERY_STEPS:
            return {}
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [self.reporter.requests() if accelerator.is_main_process else {}]
        broadcast_object_list(box, from_process=0)
        return dict(box[0])

    def _act_on_requests(self) -> bool:
        """Save, sample or stop now, where asked; True to stop training here."""
        requests = self._requests()
        if not requests:
            return False
        at = f"step {self.step} of {self.total_steps}"
        if "save" in requests:
            newest = checkpoints.newest(self.checkpoint_dir)
            if newest is None or newest.step != self.step:
                self.save_checkpoint()
            self.reporter.mark_done("save", requests["save"], message=f"checkpoint at {at} saved, as asked")
        if "sample" in requests:
            self.maybe_sample(now=True)
            what = "samples rendered" if self.spec.samples.prompts else "no samples to render (spec.samples.prompts)"
            self.reporter.mark_done("sample", requests["sample"], message=f"{what} at {at}, as asked")
        if "stop" in requests:
            self.stopped_early = True
            self.reporter.mark_done(
                "stop", requests["stop"], message=f"stopping at {at}, as asked: exporting the model of step {self.step}"
            )
            return True
        return False

    def train_step(self) -> list[Any]:
        """One optimizer step (``gradientAccumulationSteps`` micro-batches), queued on the
        device.  Returns the loss of each micro-batch as a device tensor: nothing is read back
        here, so the host can queue the next step while the device runs this one."""
        accelerator = self.accelerator
        training = self.spec.training
        accumulation = training.gradient_accumulation_steps
        losses: list[Any] = []
        for micro in range(accumulation):
            micro_batch = self.step * accumulation + micro
            with accelerator.accumulate(*self.models):
                if self.settings.compile_mode == "reduce-overhead":
                    import torch

                    # A new iteration: outputs of the previous CUDA graph replay may be reused.
                    torch.compiler.cudagraph_mark_step_begin()
                loss = self.loss(micro_batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.trainable, training.max_grad_norm)
                self.optimizer.step()
                if self.learned is not None and accelerator.sync_gradients:
                    self.learned.restore(self.base.text_encoders)
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            if accelerator.num_processes > 1:
                # The loss of the whole micro-batch (the gradients are averaged the same way);
                # it stays on the device until the next report reads it.
                loss = accelerator.reduce(loss, reduction="mean")
            losses.append(loss)
        return losses

    def _compile(self) -> list[Any]:
        """The first step of a compiled UNet, which is when torch.compile does its work; timed
        as a stage of its own."""
        import torch

        started = time.monotonic()
        losses = self.train_step()
        if self.device_info.type == "cuda":
            torch.cuda.synchronize()  # the step (and so the compile) is done only when the GPU is
        seconds = time.monotonic() - started
        self.compiled_step_done = True
        self.reporter.settings["compile_seconds"] = f"{seconds:.1f}"
        log.info(f"compiled the UNet in {seconds:.1f} s", extra={"event": "compiled"})
        self.reporter.set_stage(
            Stage.TRAINING,
            message=f"training from step {self.step + 1} to {self.total_steps}; "
            f"compiling the UNet and the first step took {seconds:.1f} s",
        )
        return losses

    def report_losses(self) -> None:
        """Read back the losses of the steps since the last report in one transfer (the
        training loop's only wait for the device) and hand them to the history and the
        progress report."""
        if not self.pending:
            return
        import torch

        pending, self.pending = self.pending, []
        values = iter(torch.stack([loss.float() for p in pending for loss in p.losses]).tolist())
        for index, finished in enumerate(pending):
            loss = sum(next(values) for _ in finished.losses) / len(finished.losses)
            self.history.append((finished.step, loss, finished.learning_rate))
            record = self.reporter.training_step if index == len(pending) - 1 else self.reporter.record_step
            record(finished.step, loss=loss, learning_rate=finished.learning_rate, at=finished.at)

    def loss(self, micro_batch: int) -> Any:
        """The DreamBooth loss of this process's share of one micro-batch (instance images,
        then as many class images, each from the concept of its photo, at its photo's size).
        Every slot draws from its own generator (see data.ExampleOrder), in this order: flip,
        crop, latent sample, noise, offset, timestep, and for a photo its caption's variation."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        dataset, training = self.spec.dataset, self.spec.training
        accelerator = self.accelerator
        slots = data.slots_of(
            micro_batch,
            batch_size=training.batch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
        )
        device = accelerator.device
        # Draws bound for a GPU go through pinned memory (see data.host_randn_rows).
        pin = device.type == "cuda"
        picks = self.instance_order.examples(slots)
        # Every example of this share of the micro-batch trains at one size.
        bucket = self.instance[picks[0]].bucket
        groups: list[tuple[list[data.Example], list[int], int]] = [(self.instance, picks, data.STREAM_NOISE)]
        if self.class_examples:
            class_picks = []
            for slot, pick in zip(slots, picks, strict=True):
                concept = self.instance[pick].concept
                class_picks.append(self.class_pools[concept][self.class_orders[concept].example(slot)])
            groups.append((self.class_examples, class_picks, data.STREAM_CLASS_NOISE))

        latents_parts, noise_parts, timestep_parts = [], [], []
        instance_crops: list[tuple[int, int]] = []
        instance_flips: list[bool] = []
        prompts: list[str] = []
        time_ids: list[list[int] | None] = []
        for group, (examples, chosen, stream) in enumerate(groups):
            gens = [data.generator(training.seed, stream, slot) for slot in slots]
            flips = [bool(torch.rand(1, generator=g) < 0.5) if dataset.random_flip else False for g in gens]
            if self.latents:
                cache = self.latents[group]
                part = cache.sample(chosen, bucket, flips, gens, pin=pin)
                crops = [cache.crop(i, bucket, f) for i, f in zip(chosen, flips, strict=True)]
            else:
                cropped = [
                    data.crop_at(
                        data.fit(examples[i].pixels, bucket), bucket, center=dataset.center_crop, flip=f, gen=g
                    )
                    for i, f, g in zip(chosen, flips, gens, strict=True)
                ]
                crops = [corner for _, corner in cropped]
                pixels = torch.stack([square for square, _ in cropped]).to(device, dtype=self.vae_dtype)
                with torch.no_grad():
                    dist = self.base.vae.encode(pixels).latent_dist
                    sampled = data.host_randn_rows(dist.mean.shape[1:], gens, pin=pin).to(device, non_blocking=True)
                    part = (dist.mean + dist.std * sampled).float()
            if group == 0:
                instance_crops, instance_flips = crops, flips
            latents_parts.append(part)
            noise = data.host_randn_rows(part.shape[1:], gens, pin=pin).to(device, non_blocking=True)
            if training.noise_offset:
                offset = data.host_randn_rows((part.shape[1], 1, 1), gens, pin=pin).to(device, non_blocking=True)
                noise += training.noise_offset * offset
            noise_parts.append(noise)
            # The family's objective draws the timestep (a DDPM step, or a flow-matching sigma).
            drawn = [self.objective.draw(g, bucket) for g in gens]
            timestep_parts.append(torch.tensor(drawn, pin_memory=pin).to(device, non_blocking=True))
            for i, g in zip(chosen, gens, strict=True):
                prompt = examples[i].prompt
                if group == 0:
                    # Caption dropout and shuffling: the last draws of the slot's generator.
                    prompt = captions.vary(
                        prompt,
                        gen=g,
                        dropout=dataset.caption_dropout,
                        shuffle=dataset.shuffle_caption,
                        keep_tokens=dataset.keep_tokens,
                    )
                prompts.append(prompt)
            time_ids += [
                self.family.time_ids(
                    original_size=examples[i].original_size, crop=crop, target=(bucket.height, bucket.width)
                )
                for i, crop in zip(chosen, crops, strict=True)
            ]
        latents = torch.cat(latents_parts)
        noise = torch.cat(noise_parts)
        timesteps = torch.cat(timestep_parts)
        conditioning = self._conditioning(prompts)
        sizes = None
        if time_ids[0] is not None:
            sizes = torch.tensor(time_ids, dtype=conditioning.hidden.dtype, pin_memory=pin).to(
                device, non_blocking=True
            )
        predicted = self.objective.predict(
            self.unet, latents=latents, noise=noise, timesteps=timesteps, conditioning=conditioning, time_ids=sizes
        )
        prediction, target = predicted.prediction, predicted.target

        half = len(slots)
        instance_pred, instance_target = prediction[:half].float(), target[:half].float()
        masks = [self.instance[i].mask for i in picks]
        if predicted.weights is None and all(m is None for m in masks):
            loss = F.mse_loss(instance_pred, instance_target)
        else:
            per_item = F.mse_loss(instance_pred, instance_target, reduction="none")
            if any(m is not None for m in masks):
                # Masked loss: each latent's error weighed by how much of it is the subject.
                size = (per_item.shape[-2], per_item.shape[-1])
                per_item = per_item * self._mask_weights(picks, bucket, instance_crops, instance_flips, size=size)
            if predicted.weights is None:
                loss = per_item.mean()
            else:
                per_item = per_item.mean(dim=tuple(range(1, per_item.ndim)))
                loss = (per_item * predicted.weights[:half]).mean()
        if self.class_examples:
            prior = F.mse_loss(prediction[half:].float(), target[half:].float())
            loss = loss + dataset.prior_loss_weight * prior
        return loss

    def _mask_weights(
        self,
        picks: list[int],
        bucket: Bucket,
        crops: list[tuple[int, int]],
        flips: list[bool],
        *,
        size: tuple[int, int],
    ) -> Any:
        """The loss weights of the photos at ``picks`` (see ``data.mask_weights``), on the device.
        With the latent cache a photo's crop is the same every step, so its weights are made and
        copied to the device once; without it (a crop drawn each step) they are made each step."""
        background = self.spec.dataset.masked_loss_background or 0.0
        device = self.accelerator.device
        if not self.latents:
            masks = [self.instance[i].mask for i in picks]
            weights = data.mask_weights(masks, bucket, crops, flips, size=size, background=background)
            return weights.to(device, non_blocking=True)
        import torch

        rows = []
        for index, crop, flipped in zip(picks, crops, flips, strict=True):
            key = (index, bucket, crop, flipped)
            if key not in self.mask_rows:
                mask = self.instance[index].mask
                made = data.mask_weights([mask], bucket, [crop], [flipped], size=size, background=background)
                self.mask_rows[key] = made.to(device)
            rows.append(self.mask_rows[key])
        return torch.cat(rows)

    # --- samples and pictures ---------------------------------------------------------------------

    def _sample_due(self) -> bool:
        return self.sampler is not None and self.sampler.due(self.step, self.total_steps)

    def maybe_sample(self, *, now: bool = False) -> list[Path] | None:
        """Render the sample prompts when this step is a sample step, or ``now`` (main process;
        the others wait).  Returns the pictures it drew with them, or None when it rendered nothing."""
        if self.sampler is None or not (self._sample_due() or (now and self.sampler.enabled)):
            return None
        drawn: list[Path] | None = None
        accelerator = self.accelerator
        renderers = [(r, swapped) for r, swapped in ((self.sampler, False), (self.ema_sampler, True)) if r is not None]
        if accelerator.is_main_process and not all(r.done(self.step) for r, _ in renderers):
            stage = self.reporter.stage
            self.reporter.set_stage(
                Stage.SAMPLING, message=f"rendering {len(self.spec.samples.prompts)} samples at step {self.step}"
            )
            encoders = [None if self.encoders_released else accelerator.unwrap_model(e) for e in self.text_encoders]
            paths: list[Path] = []
            for renderer, swapped in renderers:
                # The EMA's samples: the average in the trained weights' places while they render.
                average = self.ema.swapped_in() if swapped and self.ema is not None else contextlib.nullcontext()
                with average:
                    rendered = renderer.render(
                        self.step,
                        unet=accelerator.unwrap_model(self.unet, keep_torch_compile=False),
                        text_encoders=encoders,
                    )
                paths += rendered.paths
                if rendered.failures and not self._sample_failure_warned:
                    self._sample_failure_warned = True
                    self.reporter.warn(
                        f"spec.samples: {len(rendered.failures)} sample(s) at step {self.step} could not be rendered "
                        f"(training goes on; later failures are in the log): {rendered.failures[0]}"
                    )
            drawn = self.draw_pictures()
            self._publish([*paths, *drawn], what="samples")
            self._report_samples()
            where = self.out.uri_of(self.samples_dir)
            self.reporter.set_stage(
                stage, message=f"{len(self.spec.samples.prompts)} samples at step {self.step} in {where}"
            )
        accelerator.wait_for_everyone()
        return drawn

    def draw_pictures(self) -> list[Path]:
        """loss.png and samples.png under the output; a picture that cannot be drawn is a warning."""
        drawn: list[Path] = []
        rows = samples.existing(self.samples_dir)
        title = self.job.metadata.name or "model"
        try:
            drawn.append(
                pictures.loss_plot(
                    self.history,
                    self.output / pictures.LOSS_FILE,
                    title=title,
                    total_steps=self.total_steps,
                    sample_steps=sorted(rows),
                )
            )
            sheets = [(rows, pictures.SAMPLES_FILE, "")]
            if self.ema_sampler is not None:
                sheets.append((samples.existing(self.ema_sampler.folder), EMA_SAMPLES_FILE, "EMA"))
            for sheet_rows, name, corner in sheets:
                sheet = pictures.contact_sheet(
                    sheet_rows,
                    self.spec.samples.prompts,
                    self.output / name,
                    resolution=self.settings.resolution,
                    corner=corner,
                )
                if sheet is not None:
                    drawn.append(sheet)
        except Exception as exc:
            self.reporter.warn(f"the pictures (loss.png, samples.png) could not be drawn: {type(exc).__name__}: {exc}")
        return drawn

    def _report_samples(self) -> None:
        self.reporter.samples = [self.out.uri_of(p) for p in samples.all_samples(self.samples_dir)]
        self.reporter.thumbnails = samples.thumbnails(self.samples_dir, list(self.spec.samples.prompts))

    def _publish(self, paths: list[Path], *, what: str) -> None:
        """Upload previews to an object-store output; one that fails is a warning, not a failed run."""
        try:
            self.out.push(paths)
        except outputs.UploadFailed as exc:
            self.reporter.warn(f"the {what} could not be uploaded (the run goes on): {exc}")

    # --- checkpoints and export -------------------------------------------------------------------

    def _report_checkpoints(self) -> None:
        self.reporter.checkpoints = [
            c.ref(uri=self.out.uri_of(c.path)) for c in checkpoints.complete_checkpoints(self.checkpoint_dir)
        ]

    def save_checkpoint(self) -> None:
        accelerator = self.accelerator
        self.reporter.set_stage(Stage.CHECKPOINTING, message=f"saving checkpoint at step {self.step}")
        accumulation = self.spec.training.gradient_accumulation_steps
        slots = self.step * accumulation * self.spec.training.batch_size * accelerator.num_processes
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "seed": self.spec.training.seed,
            "fingerprint": self.fingerprint,
            # How far through the data: slots seen over every process (see data.ExampleOrder).
            "slots": slots,
            "epoch": slots // len(self.instance),
            "instance_images": len(self.instance),
            "batch_size": self.spec.training.batch_size,
            "num_processes": accelerator.num_processes,
            "method": str(self.spec.method),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # For loss.png after a resume: the steps before the checkpoint are not run again.
            "loss_history": [list(h) for h in self.history],
        }
        scores = self._evaluate()
        keep: frozenset[int] = frozenset()
        if scores and self.spec.evaluation is not None:
            state["scores"] = scores
            top = evaluation.best([*self._scored(), (self.step, scores)], self.spec.evaluation)
            keep = frozenset([top[0]]) if top else frozenset()
        saved = checkpoints.save(
            accelerator,
            self.checkpoint_dir,
            step=self.step,
            state=state,
            keep_last=self.spec.checkpoints.keep_last,
            writer=self.identity.token,
            keep=keep,
        )
        if accelerator.is_main_process:
            if self.out.remote is not None:
                self.reporter.emit(message=f"uploading checkpoint {self.step} to {self.out.uri_of(saved.path)}")
            self.out.push_checkpoint(saved.path, keep_last=self.spec.checkpoints.keep_last, keep=keep)
            # loss.png between sample steps (a sample step has just drawn it; finish() draws the last).
            if self.step < self.total_steps and not self._sample_due():
                self.draw_pictures()
        accelerator.wait_for_everyone()
        self._report_checkpoints()
        self._report_evaluation()
        stage = Stage.TRAINING if self.step < self.total_steps else Stage.CHECKPOINTING
        self.reporter.set_stage(stage, message=f"checkpoint at step {self.step} saved")

    def finish(self) -> RunResult:
        """The final checkpoint (unless the newest one is it), the last samples, the pictures,
        the exports, and for an object-store output the uploads (the manifest last)."""
        newest = checkpoints.newest(self.checkpoint_dir)
        if newest is None or newest.step != self.step:
            self.save_checkpoint()
        sampled = self.maybe_sample()
        exported_step = self._select_checkpoint()
        files: list[Any] = []
        accelerator = self.accelerator
        if accelerator.is_main_process:
            drawn = sampled if sampled is not None else self.draw_pictures()
            self.reporter.set_stage(Stage.EXPORTING, message=f"exporting to {self.output}")
            # The average in the trained weights' places for the exports (training is over).
            average = self.ema.swapped_in() if self.ema is not None and self.ema.settings.export else None
            with average or contextlib.nullcontext():
                trained = self._trained_for_export()
                files = export.export_all(
                    trained,
                    self.output,
                    job=self.job,
                    step=exported_step,
                    scores=self._scored() if self.spec.evaluation is not None else [],
                    settings=self.reporter.settings,
                    pictures=drawn,
                    samples=samples.all_samples(self.samples_dir),
                )
            if self.out.remote is not None:
                where = self.out.location()
                self.reporter.set_stage(Stage.UPLOADING, message=f"uploading {len(files)} files to {where}")
                digests = {f.path: f.sha256 for f in files}
                exported = [self.output / f.path for f in files if f.path != export.MANIFEST]
                self.out.push(exported, sha256=digests)
                # Last: a manifest in the store means everything it lists is there, whole.
                self.out.push([self.output / export.MANIFEST], sha256=digests)
            self.reporter.output_uri = self.out.location()
            self.reporter.files = files
        accelerator.wait_for_everyone()
        return RunResult(
            step=self.step,
            total_steps=self.total_steps,
            output=self.out.location(),
            files=files,
            samples=list(self.reporter.samples),
            stopped_early=self.stopped_early,
        )

    def _select_checkpoint(self) -> int:
        """output.select: best loads the checkpoint spec.evaluation ranks first (every process
        reads the same state files, so all load the same one); the step the exports hold."""
        settings = self.spec.evaluation
        if self.spec.output.select != "best" or settings is None:
            return self.step
        top = evaluation.best(self._scored(), settings)
        if top is None or top[0] == self.step:
            return self.step
        chosen = next(c for c in checkpoints.complete_checkpoints(self.checkpoint_dir) if c.step == top[0])
        checkpoints.load(self.accelerator, chosen)
        message = (
            f"output.select: best: exporting the checkpoint of step {chosen.step} ({evaluation.rule_text(settings)}: "
            f"{top[1]}), not the last step {self.step}"
        )
        log.info(message, extra={"event": "best-selected"})
        self.reporter.emit(message=message)
        return chosen.step

    def _trained_for_export(self) -> export.Trained:
        """What the exports are made of.  The frozen parts ran in the mixed precision (and a
        LoRA run's whole base model did): where that precision would show in an export (an
        fp32 export, an fp16 one of weights that went through bf16, a LoRA merged into the
        base) they come from a fresh fp32 read of the base model instead, and a LoRA is merged
        there, in fp32."""
        accelerator = self.accelerator
        unet = accelerator.unwrap_model(self.unet, keep_torch_compile=False)
        text_encoders = [accelerator.unwrap_model(e) for e in self.text_encoders]
        vae = self.base.vae
        text_adapters = self.text_adapters
        output = self.spec.output
        low = self.settings.mixed_precision
        full_model = self.spec.method == Method.DREAMBOOTH or (self.lora and output.merge_lora)
        lossy = low != "no" and (self.lora or not output.half_precision or low == "bf16")
        if full_model and lossy:
            import torch

            self.reporter.set_stage(Stage.EXPORTING, message="reading the base model again in fp32 for the export")
            pristine = load_base_model(self.spec.base_model, cache_dir=cache_dir(), store=self.store)
            vae = pristine.vae
            if self.lora:
                # The trained adapters on an fp32 copy of the base: merged there, in fp32.
                adapted = pristine.text_encoders if text_adapters else []
                lora.add_adapters(pristine.unet, adapted, self.spec.lora, family=self.family)
                lora.load_adapter_state(pristine.unet, lora.adapter_state(unet), source="the trained UNet")
                for fresh, trained in zip(adapted, text_encoders, strict=False):
                    lora.load_adapter_state(fresh, lora.adapter_state(trained), source="a trained text encoder")
                unet, text_encoders = pristine.unet, pristine.text_encoders
            elif not self.trains_text_encoder:
                text_encoders = pristine.text_encoders
            for module in (unet, vae, *text_encoders):
                module.to(torch.device("cpu"))
        return export.Trained(
            unet=unet,
            vae=vae,
            text_encoders=text_encoders,
            base=self.base,
            text_encoder_adapters=text_adapters,
            learned=self.learned,
        )

    def cleanup(self) -> None:
        self.claim.release()
        accelerator = self.accelerator
        if accelerator is None:
            return
        accelerator.end_training()
        if accelerator.num_processes == 1:
            # A second run in the same process (tests, a notebook) must be free to choose
            # another precision; accelerate keeps its state process-wide otherwise.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    # --- all of it --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        try:
            self.setup()
            self.train()
            return self.finish()
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise OutOfMemory(self.out_of_memory_message()) from exc
            raise
        finally:
            self.cleanup()

    def out_of_memory_message(self) -> str:
        import torch

        training = self.spec.training
        fixes = []
        if not training.gradient_checkpointing:
            fixes.append("spec.training.gradientCheckpointing: true")
        if str(training.optimizer) == "AdamW":
            fixes.append("spec.training.optimizer: AdamW8bit")
        if training.batch_size > 1:
            fixes.append(
                f"a smaller spec.training.batchSize (e.g. {training.batch_size // 2}, with "
                f"gradientAccumulationSteps: {training.gradient_accumulation_steps * 2} for the same effective batch)"
            )
        if str(training.mixed_precision) == "no":
            fixes.append("spec.training.mixedPrecision: fp16 (or bf16)")
        if str(training.attention) == "default":
            fixes.append("spec.training.attention: sdpa")
        if training.train_text_encoder:
            fixes.append("spec.training.trainTextEncoder: false")
        settings: Settings | None = getattr(self, "settings", None)
        if settings is not None and settings.compile_mode == "reduce-overhead":
            fixes.append("spec.training.compileMode: default (CUDA graphs keep memory of their own)")
        if not fixes:
            fixes.append(f"a smaller spec.dataset.resolution (now {self.spec.resolution}) or a GPU with more memory")
        peak = ""
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            peak = f" (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} of {total / 2**30:.1f} GiB)"
        return f"the GPU ran out of memory at step {self.step}{peak}; settings that use less: " + "; ".join(fixes)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Out of GPU memory, also where torch.compile wrapped it into an error of its own."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, torch.OutOfMemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
