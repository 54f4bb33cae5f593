"""Do the files this trainer exports load in a web UI's own loader?  InvokeAI's, from PyPI.

``make check-webui-loaders`` runs this with the project's ``.venv``:

1. InvokeAI gets a virtual environment of its own, created once per machine under
   ``$FINETUNE_CACHE/invokeai-<version>-py3.X`` (``~/.cache/finetune-operator`` by default),
   installed from PyPI with the pins of ``scripts/invokeai-constraints.txt``, so that its pins
   (diffusers, transformers, torch) never meet ours.
2. Here, with this project's own code: Stable Diffusion 1.5's architecture with random weights
   (``finetune_trainer.tiny.build_random_pipeline``, from the shipped configs), read back as a
   base model, and exported in fp16 (``output.halfPrecision``) as the trainer exports it: the
   single ``.safetensors`` in the original SD layout, the diffusers folder, and LoRA adapters
   (kohya's targets, on the UNet and the text encoder, their B matrices made non-zero) in both
   layouts, with and without the text encoder; and LoCon, LoHa, LoKr and DoRA adapters in kohya's
   layout, with the change each module's weight should see as the LyCORIS package's own modules
   make it from the file.
3. In InvokeAI's environment, ``scripts/webui_loaders_invokeai.py`` hands each file to
   InvokeAI's model probe (what its model manager runs when a model is added) and then to its
   model loader, applies each LoRA to the loaded UNet and text encoder with InvokeAI's layer
   patcher as its generation nodes do, and runs the patched UNet once.

Exit status 0 when InvokeAI identifies every file as what it is (an SD-1 main model: the
single file as a checkpoint, the folder as diffusers; the kohya-layout LoRA files as SD-1
LoRAs), loads each to the very tensors that were exported, and applies each LoRA to every
module it names; 1 otherwise, naming the file, what InvokeAI said and its error.  The
diffusers-layout LoRA files, which InvokeAI does not read for SD 1.x whoever wrote them, are
checked to be refused for that reason and no other.  Everything heavy is written in a
temporary folder (``$FINETUNE_WEBUI_WORKDIR``, else the system's) that is removed at the end;
``--keep`` keeps it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INVOKEAI_VERSION = "6.14.2"
# InvokeAI's own pins for its CPU and CUDA builds (torch 2.7.1, torchvision 0.22.1): the builds
# it is tested with.  The "+cpu" wheels live outside PyPI; PyPI's are the CUDA builds, which
# run on a CPU as well.
INVOKEAI_REQUIREMENTS = (f"invokeai=={INVOKEAI_VERSION}", "torch==2.7.1", "torchvision==0.22.1")
CONSTRAINTS = ROOT / "scripts" / "invokeai-constraints.txt"
INVOKEAI_SIDE = ROOT / "scripts" / "webui_loaders_invokeai.py"

RANK, ALPHA = 8, 4.0
# The standard deviation of the B matrices: small, as a trained adapter's, but far from zero.
B_STD = 0.01
UNSUPPORTED = "InvokeAI reads SD-1 LoRAs in kohya's layout only"
TI_TOKEN = "<webui-check>"
TI_UNSUPPORTED = (
    "InvokeAI 6.14 reads a diffusers-layout embedding ({token: vectors}) only with one 1-D vector: it takes the "
    "width from the first dimension, which a (vectors, width) tensor (diffusers' own textual_inversion.py writes "
    "(1, width)) makes the count of vectors"
)
# LoRA's other kinds (spec.training.lora.type), each checked against the LyCORIS package.
KINDS = ("locon", "loha", "lokr", "dora")
# Each factor's standard deviation: large enough that every module's change of weight stands far
# above fp32's rounding of the weight itself, which the comparison subtracts.
ADAPTER_STD = 0.2
# What InvokeAI is known to apply otherwise than LyCORIS, and why: checked to still be so (a note
# says when it no longer is).
KNOWN_WRONG = {
    "dora": (
        "InvokeAI 6.14 reads a kohya file's dora_scale as one magnitude per input column (LyCORIS' older "
        "convention); peft, the DoRA paper and LyCORIS' default (wd_on_output, 4.1.3) keep one per output row, shaped "
        "(out, 1) as this file has it"
    ),
}


def log(message: str) -> None:
    print(f"[webui-loaders] {message}", flush=True)


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator"
    )
    return Path(root)


# --- InvokeAI's environment ---------------------------------------------------------------------


def invokeai_venv() -> Path:
    """InvokeAI's virtual environment, created (or re-created, when the pins changed) here."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = cache_dir() / f"invokeai-{INVOKEAI_VERSION}-py{version}"
    python = path / "bin" / "python"
    digest = hashlib.sha256(
        ("\n".join(INVOKEAI_REQUIREMENTS) + "\n--\n" + CONSTRAINTS.read_text()).encode()
    ).hexdigest()
    stamp = path / ".finetune-stamp"
    if stamp.is_file() and stamp.read_text().strip() == digest and python.exists():
        return python
    started = time.monotonic()
    log(f"creating InvokeAI {INVOKEAI_VERSION}'s environment in {path} (a few GB from PyPI: minutes)")
    # A fresh environment from the base interpreter: nothing of this project's .venv in it.
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *INVOKEAI_REQUIREMENTS, "-c", str(CONSTRAINTS)], check=True)
    stamp.write_text(digest + "\n")
    log(f"InvokeAI's environment is ready ({time.monotonic() - started:.0f} s)")
    return python


# --- our exports ----------------------------------------------------------------------------------


def digests(model: Any) -> dict[str, str]:
    """Each tensor of a model as exported (fp16), by its diffusers name: what a loader must give
    back.  The text encoder's names without ``text_model.`` (transformers 5.6 dropped it)."""
    import torch

    out = {}
    for key, tensor in model.state_dict().items():
        data = tensor.detach().to(torch.float16) if tensor.is_floating_point() else tensor.detach()
        name = key.removeprefix("text_model.")
        out[name] = hashlib.blake2b(data.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()
    return out


def job_manifest(name: str, base_dir: Path, output: Path, **spec: Any) -> Any:
    """A FineTuneJob as a user would write it: what ``export_all`` takes its formats, names and
    precision from."""
    from finetune_api.v1alpha1 import FineTuneJob

    return FineTuneJob.model_validate(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "baseModel": {"uri": str(base_dir), "type": "v1x"},
                "dataset": {"instanceImages": str(base_dir.parent / "images"), "instancePrompt": "a photo of sks dog"},
                "output": {"uri": str(output), "halfPrecision": True},
                **spec,
                "training": {"maxSteps": 1, **spec.get("training", {})},
            },
        }
    )


def export_files(work: Path) -> dict[str, Any]:
    """SD 1.5-shaped random weights through this project's exporters (``export_all``, as at the
    end of a run); returns what was written and what each file is."""
    import torch
    from safetensors.torch import save_file

    from finetune_api.v1alpha1 import BaseModelSource, ModelType
    from finetune_trainer import export, lora, textual_inversion, tiny
    from finetune_trainer.model import load_base_model

    started = time.monotonic()
    base_dir = tiny.build_random_pipeline(work / "base", model_type="v1x", seed=0)
    log(f"built SD 1.5's architecture with random weights ({time.monotonic() - started:.0f} s)")
    # What the loader would otherwise fetch from the hub at its first single-file load: the
    # pipeline's config files (every *.json and *.txt), taken from the same shipped configs.
    hub_configs = work / "hub-configs"
    for source in sorted(base_dir.rglob("*")):
        if source.is_file() and source.suffix in (".json", ".txt"):
            target = hub_configs / source.relative_to(base_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    base = load_base_model(BaseModelSource(uri=str(base_dir), type=ModelType.V1X), cache_dir=work / "cache")
    shutil.rmtree(base_dir)  # read: 4 GB of disk back before the exports take theirs

    # A DreamBooth run's exports (output.halfPrecision: export_all casts the models to fp16).
    started = time.monotonic()
    full = work / "dreambooth"
    job = job_manifest("webui-check", base_dir, full, method="DreamBooth")
    full.mkdir()
    trained = export.Trained(unet=base.unet, vae=base.vae, text_encoders=list(base.text_encoders), base=base)
    export.export_all(trained, full, job=job, step=0, settings={})
    log(f"exported the single file and the diffusers folder in fp16 ({time.monotonic() - started:.0f} s)")
    # What a loader must give back: every tensor as exported.
    weights = {"unet": digests(base.unet), "vae": digests(base.vae), "text_encoder": digests(base.text_encoders[0])}
    main = {"type": "main", "base": "sd-1", "variant": "normal", "prediction_type": "epsilon"}
    files: list[dict[str, Any]] = [
        {
            "path": str(full / export.single_file_name(job)),
            "kind": "main",
            "layout": "single file (original SD layout)",
            "expect": {**main, "format": "checkpoint"},
        },
        {
            "path": str(full / export.DIFFUSERS_DIR),
            "kind": "main",
            "layout": "diffusers folder",
            "expect": {**main, "format": "diffusers"},
        },
    ]

    # A LoRA run's exports, with adapters on kohya's targets and their B matrices made non-zero
    # (training starts them at zero): UNet only (the default), and UNet + text encoder.
    settings = {"rank": RANK, "alpha": ALPHA, "targets": "kohya"}
    lora_job = job_manifest("x", base_dir, work, method="LoRA", training={"lora": settings})
    lora.add_adapters(base.unet, list(base.text_encoders), lora_job.spec.lora, family=base.family)
    generator = torch.Generator().manual_seed(1)
    for model in (base.unet, *base.text_encoders):
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * B_STD
                parameter.data.copy_(values.to(parameter.dtype))
    for text, what in ((False, "UNet"), (True, "UNet + text encoder")):
        name = "webui-check-unet-te" if text else "webui-check-unet"
        output = work / name
        output.mkdir()
        lora_settings = {**settings, "trainTextEncoder": text}
        job = job_manifest(name, base_dir, output, method="LoRA", training={"lora": lora_settings})
        trained = export.Trained(
            unet=base.unet, vae=base.vae, text_encoders=list(base.text_encoders), base=base, text_encoder_adapters=text
        )
        export.export_all(trained, output, job=job, step=0, settings={})
        files.append(
            {
                "path": str(output / export.lora_file_name(job)),
                "kind": "lora",
                "layout": f"kohya file ({what})",
                "expect": {"type": "lora", "base": "sd-1", "format": "lycoris"},
            }
        )
        # InvokeAI reads an SD 1.x/2.x LoRA in kohya's layout only (its probe measures the
        # token width on lora_unet_/lora_te_ keys, its loader groups layers by those names):
        # these are checked to be refused for that reason and no other.
        folder = output / lora.LORA_DIR
        for path, layout in ((folder, "diffusers folder"), (folder / lora.DIFFUSERS_FILE, "diffusers file")):
            entry = {"path": str(path), "kind": "lora", "layout": f"{layout} ({what})", "unsupported": UNSUPPORTED}
            files.append(entry)
    log("exported the LoRA files (kohya and diffusers layouts; UNet only, and UNet + text encoder)")

    # LoRA's other kinds, UNet + text encoder, in kohya's layout: what InvokeAI's patcher must do
    # to each module is what the LyCORIS package's own modules do with the file.
    for kind in KINDS:
        for model in (base.unet, *base.text_encoders):
            strip_adapters(model)
        name = f"webui-check-{kind}"
        output = work / name
        output.mkdir()
        kind_settings = {**settings, "type": kind, "trainTextEncoder": True}
        job = job_manifest(name, base_dir, output, method="LoRA", training={"lora": kind_settings})
        lora.add_adapters(base.unet, list(base.text_encoders), job.spec.lora, family=base.family)
        randomize_adapters([base.unet, *base.text_encoders], generator)
        trained = export.Trained(
            unet=base.unet, vae=base.vae, text_encoders=list(base.text_encoders), base=base, text_encoder_adapters=True
        )
        export.export_all(trained, output, job=job, step=0, settings={})
        path = output / export.lora_file_name(job)
        deltas = path.with_suffix(".deltas.safetensors")
        save_file(lycoris_deltas(path, base.unet, base.text_encoders[0]), str(deltas))
        entry = {
            "path": str(path),
            "kind": "lora",
            "layout": f"kohya file, {kind} (UNet + text encoder)",
            "expect": {"type": "lora", "base": "sd-1", "format": "lycoris"},
            "deltas": str(deltas),
        }
        if kind in KNOWN_WRONG:
            entry["known_wrong"] = KNOWN_WRONG[kind]
        files.append(entry)
    log(f"exported {', '.join(KINDS)} adapters in kohya's layout, with LyCORIS' own deltas for each module")

    # Textual Inversion: a new word of two vectors in the text encoder (random, as if learned).
    for model in (base.unet, *base.text_encoders):
        strip_adapters(model)
    name = "webui-check-ti"
    output = work / name
    output.mkdir()
    word = {"token": TI_TOKEN, "initializer": "a photo", "vectors": 2}
    dataset = {"instanceImages": str(work / "images"), "instancePrompt": f"a photo of {TI_TOKEN}"}
    job = job_manifest(name, base_dir, output, method="TextualInversion", textualInversion=word, dataset=dataset)
    learned = textual_inversion.add_word(base.tokenizers, base.text_encoders, job.spec.textual_inversion)
    with torch.no_grad():
        table = base.text_encoders[0].get_input_embeddings().weight
        table[learned.ids[0]] = (torch.randn(2, table.shape[1], generator=generator) * 0.02).to(table.dtype)
    trained = export.Trained(
        unet=base.unet, vae=base.vae, text_encoders=list(base.text_encoders), base=base, learned=learned
    )
    export.export_all(trained, output, job=job, step=0, settings={})
    reference = output / textual_inversion.DIFFUSERS_FILES[0]
    files.append(
        {
            "path": str(output / export.single_file_name(job)),
            "kind": "embedding",
            "layout": "web-UI embedding file (emb_params)",
            "expect": {"type": "embedding", "base": "sd-1", "format": "embedding_file"},
            "vectors": str(reference),
        }
    )
    files.append(
        {
            "path": str(reference),
            "kind": "embedding",
            "layout": "diffusers' learned_embeds.safetensors",
            "unsupported": TI_UNSUPPORTED,
        }
    )
    log("exported a Textual Inversion word in the web UIs' and diffusers' layouts")
    for entry in files:
        if not Path(entry["path"]).exists():
            raise FileNotFoundError(f"the exporter wrote no {entry['path']}")
    return {"files": files, "hub_configs": str(hub_configs), "weights": weights}


def strip_adapters(model: Any) -> None:
    """The model without its adapters, unmerged: the base weights again."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def randomize_adapters(models: list[Any], generator: Any) -> None:
    """Every factor random (training starts some at zero), DoRA's magnitudes a few percent off the
    weights' norms: a file whose every weight matters."""
    import torch

    for model in models:
        for name, parameter in model.named_parameters():
            if not any(part in name for part in (".hada_", ".lokr_", ".lora_")):
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                parameter.data.mul_((1 + 0.05 * noise).to(parameter.dtype))
            else:
                parameter.data.copy_((noise * ADAPTER_STD).to(parameter.dtype))


class _Named:
    """Wraps a text encoder under ``text_model.``, the name every LoRA file gives its modules."""

    def __new__(cls, text_encoder: Any) -> Any:
        import torch

        holder = torch.nn.Module()
        holder.text_model = text_encoder
        return holder


def lycoris_deltas(path: Path, unet: Any, text_encoder: Any) -> dict[str, Any]:
    """Each layer of a kohya-layout file -> the change of its module's weight, as the LyCORIS
    package's own module for the layer's kind makes it: the module (its weights as exported,
    fp16) under LyCORIS' forward, read back on the identity."""
    import copy

    import torch
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    weights = {k: v.float() for k, v in load_file(str(path)).items()}
    layers = sorted({key.partition(".")[0] for key in weights})
    deltas: dict[str, Any] = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", _Named(text_encoder))):
        flat = {name.replace(".", "_"): module for name, module in model.named_modules() if name}
        for layer in (x for x in layers if x.startswith(prefix)):
            adapted = flat[layer.removeprefix(prefix)]
            # The base layer under peft's adapter: the module as the base model has it.
            module = copy.deepcopy(getattr(adapted, "base_layer", adapted)).float()
            module.weight.data = module.weight.data.half().float()
            before = module.weight.data.clone()
            kind, params = get_module(weights, layer)
            if kind is None:
                raise ValueError(f"LyCORIS does not recognise the layer {layer} of {path.name}")
            lycoris = make_module(kind, params, layer, module)
            if any(k > 1 for k in before.shape[2:]):
                # A LoCon's 3x3 convolution: read on the identity it would take a batch of
                # in x 9 inputs; LyCORIS' LoCon module gives its change of weight itself.
                if type(lycoris).__name__ != "LoConModule":
                    raise ValueError(f"{layer}: no reference for a {type(lycoris).__name__} on a {tuple(before.shape)}")
                with torch.no_grad():
                    deltas[layer] = lycoris.get_diff_weight(multiplier=1, shape=before.shape)[0].contiguous()
                continue
            lycoris.apply_to()
            width = before.shape[1]
            eye = torch.eye(width).reshape(width, width, *([1] * (before.dim() - 2)))
            with torch.no_grad():
                out = module(eye)
                bias = module.bias if module.bias is not None else torch.zeros(before.shape[0])
                after = (out - bias.reshape(1, -1, *([1] * (before.dim() - 2)))).transpose(0, 1)
            deltas[layer] = (after.reshape(before.shape) - before).contiguous()
    return deltas


# --- the verdict ----------------------------------------------------------------------------------


def verdict(results: list[dict[str, Any]]) -> bool:
    ok = True
    for result in results:
        name = f"{Path(result['path']).name} [{result['layout']}]"
        identified = result.get("identified") or {}
        line = ", ".join(f"{k}={v}" for k, v in identified.items()) or "not identified"
        status = "ok" if result["ok"] else "FAIL"
        print(f"{status:4} {name}\n     probe: {line}", flush=True)
        for note in result.get("notes", []):
            print(f"     {note}", flush=True)
        for problem in result.get("problems", []):
            print(f"     problem: {problem}", flush=True)
        ok = ok and bool(result["ok"])
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (about 4 GB)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    python = invokeai_venv()
    root = os.environ.get("FINETUNE_WEBUI_WORKDIR") or None
    work = Path(tempfile.mkdtemp(prefix="finetune-webui-", dir=root))
    try:
        exported = export_files(work)
        (work / "files.json").write_text(json.dumps(exported, indent=2))
        env = {
            **os.environ,
            # InvokeAI's root (its config, database, models folder) and the hub cache: both in the
            # temporary folder, and nothing fetched from anywhere.
            "INVOKEAI_ROOT": str(work / "invokeai-root"),
            "HF_HOME": str(work / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONNOUSERSITE": "1",
            "TQDM_DISABLE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        env.pop("PYTHONPATH", None)
        log(f"InvokeAI {INVOKEAI_VERSION}: probing and loading each file")
        run = subprocess.run(
            [str(python), str(INVOKEAI_SIDE), str(work / "files.json"), str(work / "results.json")],
            env=env,
            check=False,
        )
        if run.returncode != 0 or not (work / "results.json").is_file():
            log(f"InvokeAI's side failed (exit {run.returncode})")
            return 1
        results = json.loads((work / "results.json").read_text())
        ok = verdict(results)
        log(f"{'passed' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
        return 0 if ok else 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
