"""``README.md`` in the output folder: what was trained, on what, how, and how to load each
file, as diffusers' training scripts write one (Hugging Face's model-card front matter, so the
folder can be pushed to a hub as it is)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from finetune_api.v1alpha1 import Evaluation, FineTuneJob, FineTuneJobSpec, Method, ModelType, OutputFile
from finetune_trainer.job import trains_text_encoder

CARD = "README.md"
_FAMILY = {
    ModelType.V1X: "Stable Diffusion 1.x",
    ModelType.V2X_512: "Stable Diffusion 2.x (512 px)",
    ModelType.V2X: "Stable Diffusion 2.x (768 px, v-prediction)",
    ModelType.SDXL: "Stable Diffusion XL",
    ModelType.FLUX1: "Flux.1",
}
_PIPELINE = {ModelType.SDXL: "StableDiffusionXLPipeline", ModelType.FLUX1: "FluxPipeline"}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def _what(path: str, *, name: str, ti: bool = False) -> str:
    if path.startswith("diffusers/"):
        return "diffusers folder"
    if path.startswith("lora/") and path.endswith(("adapter_config.json", "adapter_model.safetensors")):
        return "the adapter, peft's layout (PeftModel.from_pretrained)"
    if path.startswith("lora/"):
        return "LoRA, diffusers (PEFT) layout"
    if path == f"{name}-lora.safetensors":
        return "LoRA, kohya / web-UI layout"
    if path == f"{name}.safetensors":
        return "the whole model in one file (original layout, web UIs)"
    if path == f"{name}.yaml":
        return "its original config (web UIs read it beside the file)"
    if path.startswith("learned_embeds"):
        return "the learned word, diffusers' layout (load_textual_inversion)"
    if path == f"{name}_emb.safetensors" or (path == f"{name}.safetensors" and ti):
        return "the learned word, the web UIs' embedding layout"
    if path == "loss.png":
        return "loss and learning rate by step"
    if path == "samples.png":
        return "the preview samples, by step"
    return ""


def render(
    job: FineTuneJob,
    *,
    step: int,
    settings: dict[str, str],
    files: Sequence[OutputFile],
    scores: Sequence[tuple[int, dict[str, float]]] = (),
) -> str:
    spec = job.spec
    name = job.metadata.name or "model"
    model_type = ModelType(spec.base_model.type)
    lora = spec.method == Method.LORA
    ti = spec.method == Method.TEXTUAL_INVERSION
    pipeline = _PIPELINE.get(model_type, "StableDiffusionPipeline")
    paths = {f.path for f in files}
    front = {
        "base_model": spec.base_model.uri,
        "library_name": "diffusers",
        "tags": [
            "text-to-image",
            "diffusers",
            "flux" if model_type == ModelType.FLUX1 else "stable-diffusion",
            "lora" if lora else ("textual-inversion" if ti else "dreambooth"),
            "finetune-operator",
        ],
        "instance_prompt": spec.dataset.instance_prompt,
        "inference": True,
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        f"# {name}",
        "",
        f"A {'LoRA' if lora else 'DreamBooth'} fine-tune of `{spec.base_model.uri}` ({_FAMILY[model_type]}), "
        f"trained for {step} steps by finetune-operator. The files below are in this folder.",
        "",
        "## Prompts",
        "",
        f"- Instance prompt: `{spec.dataset.instance_prompt}` (use its token in your prompts).",
    ]
    if spec.dataset.class_prompt:
        prior = (
            f", prior preservation with {spec.dataset.num_class_images} class images"
            if spec.dataset.prior_preservation
            else ""
        )
        lines.append(f"- Class prompt: `{spec.dataset.class_prompt}`{prior}.")
    for prompt in spec.samples.prompts:
        lines.append(f"- Sample prompt: `{prompt}`")
    training = spec.training
    rows = [
        ("method", str(spec.method)),
        ("steps", str(step)),
        ("resolution", settings.get("resolution", str(spec.resolution))),
        ("batch size x accumulation", f"{training.batch_size} x {training.gradient_accumulation_steps}"),
        ("learning rate", f"{settings.get('learning_rate', spec.learning_rate)} ({training.lr_scheduler})"),
        ("optimizer", settings.get("optimizer", str(training.optimizer))),
        ("mixed precision", settings.get("mixed_precision", str(training.mixed_precision))),
        (
            "text encoder trained",
            "its embeddings of the new word" if ti else _text_encoder_trained(spec),
        ),
        ("seed", str(training.seed)),
        ("exported in", "fp16" if spec.output.half_precision else "fp32"),
    ]
    if lora:
        settings_of = spec.lora
        kind = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[str(settings_of.type)]
        shape = f", factor {settings_of.factor}" if settings_of.factor is not None else ""
        shape += ", both factors low-rank" if settings_of.decompose_both else ""
        rows.insert(
            1,
            (kind, f"rank {settings_of.rank}, alpha {settings_of.alpha:g}{shape}, targets {settings_of.targets}"),
        )
    if ti and spec.textual_inversion is not None:
        word = spec.textual_inversion
        rows.insert(1, ("Textual Inversion", f"word {word.token}, {word.vectors} vector(s), from {word.initializer!r}"))
    if lora and spec.lora.new_tokens is not None:
        new = spec.lora.new_tokens
        rows.insert(
            2,
            (
                "pivotal tuning",
                f"word {new.token}, {new.vectors} vector(s), from {new.initializer!r}, learned in the first "
                f"{new.train_fraction:.0%} of the run",
            ),
        )
    average = training.ema
    if average is not None:
        ramp = "warm-up" if average.warmup else "plain ramp"
        exported = (
            "this model is the average" if average.export else "this model is the trained weights, not the average"
        )
        rows.append(("EMA", f"decay {average.decay:g} ({ramp}), every {average.every_steps} step(s); {exported}"))
    masks = spec.dataset.masks
    if masks is not None:
        where = "the photos' alpha" if masks.source == "alpha" else f"a '{masks.folder or 'masks'}' folder"
        background = spec.dataset.masked_loss_background or 0
        rows.append(("masked loss", f"masks from {where}, background weight {background:g}"))
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "## Files", "", "| file | size | what it is |", "|---|---|---|"]
    for entry in files:
        if entry.path.startswith("diffusers/") and not entry.path.endswith("model_index.json"):
            continue
        what = _what(entry.path, name=name, ti=ti)
        shown = "diffusers/" if entry.path == "diffusers/model_index.json" else entry.path
        folder_bytes = sum(f.size_bytes for f in files if f.path.startswith("diffusers/"))
        size = _size(folder_bytes if shown == "diffusers/" else entry.size_bytes)
        lines.append(f"| `{shown}` | {size} | {what} |")
    lines += ["", "`manifest.json` lists every file with its SHA-256.", "", "## How to use", ""]
    shown_prompt = spec.dataset.instance_prompt
    if "diffusers/model_index.json" in paths:
        lines += [
            "The diffusers folder (fp32 unless you ask for `torch_dtype=torch.float16`):",
            "",
            "```python",
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained("diffusers")  # this folder',
            f'image = pipe("{spec.dataset.instance_prompt}").images[0]',
            "```",
            "",
        ]
    if ti and spec.textual_inversion is not None:
        lines += [f"The word `{spec.textual_inversion.token}`, on the base model:", ""]
        lines += _word_lines(spec.textual_inversion.token, f"{name}.safetensors", pipeline, paths, prompt=shown_prompt)
    elif f"{name}.safetensors" in paths:
        beside = f" with `{name}.yaml` beside it" if f"{name}.yaml" in paths else ""
        lines += [
            f"The single file: copy `{name}.safetensors`{beside} into the web UI's `models/Stable-diffusion/` "
            f'(ComfyUI: `models/checkpoints/`), or `{pipeline}.from_single_file("{name}.safetensors")`.',
            "",
        ]
    peft_layout = any(p.endswith("/adapter_config.json") for p in paths)
    if f"{name}-lora.safetensors" in paths and peft_layout:
        parts = sorted(p.split("/")[1] for p in paths if p.startswith("lora/") and p.endswith("/adapter_config.json"))
        lines += [
            "The adapter, on the base model (diffusers' `load_lora_weights` does not read LoHa or LoKr; peft does):",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            f'pipe = {pipeline}.from_pretrained("<the base model>")',
            *[f'pipe.{part} = PeftModel.from_pretrained(pipe.{part}, "lora/{part}")' for part in parts],
            "```",
            "",
            f"In a web UI: `{name}-lora.safetensors` into `models/Lora/`, then `<lora:{name}-lora:1>` in the prompt "
            "(A1111 and Forge read LyCORIS' LoHa and LoKr files as LoRAs). In ComfyUI: into `models/loras/`, applied "
            "with a LoraLoader node. InvokeAI reads this file too.",
            "",
        ]
    elif f"{name}-lora.safetensors" in paths:
        dora = lora and str(spec.lora.type) == "dora"
        load = (
            # diffusers 0.42 drops a kohya-layout file's dora_scale (it warns), leaving a plain LoRA.
            'pipe.load_lora_weights("lora")  # the folder: diffusers reads DoRA in this layout only'
            if dora
            else 'pipe.load_lora_weights("lora")  # or the single file: pipe.load_lora_weights("'
            + f'{name}-lora.safetensors")'
        )
        lines += [
            "The LoRA, on the base model:",
            "",
            "```python",
            f'pipe = {pipeline}.from_pretrained("<the base model>")',
            load,
            "```",
            "",
            (
                f"In ComfyUI: `{name}-lora.safetensors` into `models/loras/`, applied to the Flux model with a "
                "LoraLoaderModelOnly node (its module names are the original Flux.1 layout's, as kohya's scripts "
                "write them)."
                if model_type == ModelType.FLUX1
                else f"`{name}-lora.safetensors` holds DoRA's magnitudes as LyCORIS writes them by default, one per "
                "output row (`dora_scale`, shaped (out, 1)), and the LyCORIS package applies it as trained. A reader "
                "that takes a `dora_scale` as one per input column (LyCORIS' older convention; InvokeAI 6.14 does) "
                "applies it otherwise: there, use a `type: lora` run."
                if dora
                else f"In a web UI: `{name}-lora.safetensors` into `models/Lora/`, then `<lora:{name}-lora:1>` in "
                f"the prompt. In ComfyUI: into `models/loras/`, applied with a LoraLoader node. InvokeAI reads this "
                "file too (not the `lora/` folder's)."
            ),
            "",
        ]
    new_tokens = spec.lora.new_tokens if lora else None
    if new_tokens is not None:
        lines += [
            f"Pivotal tuning: the adapter and the word `{new_tokens.token}` were learned together, so load both (the "
            "LoRA as above, then the word):",
            "",
        ]
        emb = f"{name}_emb.safetensors"
        lines += _word_lines(new_tokens.token, emb, pipeline, paths, prompt=shown_prompt, on_base=False)
    if scores and spec.evaluation is not None:
        lines += _score_lines(spec.evaluation, scores, exported=step, select=spec.output.select)
    pictures = [p for p in ("loss.png", "samples.png") if p in paths]
    if pictures:
        lines += ["## How it went", ""]
        lines += [f"![{p.removesuffix('.png')}]({p})" for p in pictures]
        lines.append("")
    return "\n".join(lines)


def _score_lines(
    settings: Evaluation, scores: Sequence[tuple[int, dict[str, float]]], *, exported: int, select: str
) -> list[str]:
    """The scores of each checkpoint kept, the exported one marked."""
    from finetune_trainer import evaluation

    names = [n for n in ("dino", "clipI", "clipT", "holdOutLoss") if any(n in s for _, s in scores)]
    top = evaluation.best(scores, settings)
    lines = [
        "## Scores",
        "",
        " ".join([*_what_is_scored(settings), f"Ranked by {evaluation.rule_text(settings)}"])
        + (f": step {top[0]} first." if top else "."),
        f"This model is the checkpoint of step {exported} (output.select: {select}).",
        "",
        "| step | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for at, values in scores:
        mark = " (exported)" if at == exported else ""
        cells = " | ".join(f"{values[n]:.4f}" if n in values else "" for n in names)
        lines.append(f"| {at}{mark} | {cells} |")
    return [*lines, ""]


def _what_is_scored(settings: Evaluation) -> list[str]:
    said = []
    if settings.clip_model is not None or settings.dino_model is not None:
        said.append(
            f"{len(settings.prompts)} prompt(s) x {settings.images_per_prompt} image(s) at each checkpoint, scored as "
            "the DreamBooth paper does (DINO and CLIP-I: each image against the instance photos; CLIP-T: against its "
            "prompt)."
        )
    if settings.hold_out:
        said.append(f"holdOutLoss: the denoising loss of {settings.hold_out} photo(s) kept out of training.")
    return said


def _text_encoder_trained(spec: FineTuneJobSpec) -> str:
    if spec.method == Method.LORA and spec.lora.new_tokens is not None:
        return "adapters and the new word's embeddings" if spec.lora.train_text_encoder else "the new word's embeddings"
    return "yes" if trains_text_encoder(spec) else "no"


def _word_lines(
    token: str, webui_file: str, pipeline: str, paths: set[str], *, prompt: str | None, on_base: bool = True
) -> list[str]:
    """How to load a learned word: diffusers' files, then the web UIs' (whose word is the file's name)."""
    second = "learned_embeds_2.safetensors" in paths
    word = webui_file.removesuffix(".safetensors")
    return [
        "```python",
        *([f'pipe = {pipeline}.from_pretrained("<the base model>")'] if on_base else []),
        f'pipe.load_textual_inversion("learned_embeds.safetensors", token="{token}"'
        + (", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)" if second else ")"),
        *(
            [
                f'pipe.load_textual_inversion("learned_embeds_2.safetensors", token="{token}", '
                "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
            ]
            if second
            else []
        ),
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
        f"In a web UI: `{webui_file}` into `embeddings/`; its file name is the word there, so write `{word}` in "
        f"the prompt where you trained `{token}` (or rename the file). In ComfyUI: into `models/embeddings/`, then "
        f"`embedding:{word}` in the prompt. InvokeAI reads it too.",
        "",
    ]


def write(path: Path, text: str) -> Path:
    from finetune_trainer import storage

    storage.write_text_atomic(path, text)
    storage.make_readable(path)
    return path
