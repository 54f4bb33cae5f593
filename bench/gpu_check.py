"""One short run of each path that only a GPU exercises: the first thing to run on a GPU.

    make gpu-check                 # on a GPU: runs every check, writes bench/results/gpu-check.md
    make gpu-check GPU_CHECK_ARGS=--cpu    # the same checks on tiny models on this CPU (the harness)

On a machine without a GPU, ``make gpu-check`` prints what it would run and exits 0.

Each check runs in a process of its own (its peak memory, CUDA context and accelerate state are
its own) on models of the real widths with random weights, built on the spot from the
architecture configs the trainer ships (depth cut where that saves minutes: fewer blocks, the
same layers); nothing is downloaded.  A check passes when its run ends as the trainer reports
success and what it wrote is what a user would load (a sample that is not one flat colour, a
kohya LoRA file with the fused layers).  Results: each check's outcome, peak GPU memory and time,
in ``bench/results/gpu-check.md`` (and ``.json``).  The whole list takes under 8 minutes on
one H100.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PROMPT = "a photo of sks ball"


@dataclass(frozen=True)
class Check:
    name: str
    what: str  # the path it exercises, in a sentence
    run: Callable[[Path, bool], dict[str, Any]]  # (work folder, on a GPU) -> notes
    timeout_s: int


# --- the checks ------------------------------------------------------------------------------------


def check_precision(work: Path, gpu: bool) -> dict[str, Any]:
    """bf16 only on GPUs that compute it in hardware; one convolution under autocast in the
    precision chosen for a default job (``mixedPrecision: fp16``, ``preferBf16: true``)."""
    import torch

    from finetune_api.v1alpha1 import parse_manifest
    from finetune_trainer.job import detect_device, resolve_settings

    spec = parse_manifest(_manifest(work, "v1x", model="/unused", mixedPrecision="fp16")).spec
    device = detect_device(spec)
    settings, _ = resolve_settings(spec, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision, torch.float32)
    where = f"cuda:{device.index}" if gpu else "cpu"
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(where)
    with torch.autocast(torch.device(where).type, dtype=dtype, enabled=dtype != torch.float32):
        out = conv(torch.randn(2, 64, 128, 128, device=where))
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"a convolution under {settings.mixed_precision} autocast gave non-finite values")
    capability = torch.cuda.get_device_capability(device.index) if gpu else None
    return {
        "capability": capability,
        "bf16": device.bf16,
        "mixed_precision": settings.mixed_precision,
        "free_gib": round(device.memory_bytes / 2**30, 1),
    }


def check_adamw8bit(work: Path, gpu: bool) -> dict[str, Any]:
    from finetune_trainer.job import _adamw8bit_step, probe

    problem = probe(_adamw8bit_step, "cuda:0" if gpu else "cpu")
    if problem:
        raise RuntimeError(problem)
    return {}


def check_xformers(work: Path, gpu: bool) -> dict[str, Any]:
    from finetune_trainer.job import _installed, _xformers_op, probe

    if not _installed("xformers"):
        return {"skipped": "xformers is not installed"}
    if not gpu:
        return {"skipped": "xformers needs a GPU"}
    problem = probe(_xformers_op, "cuda:0")
    if problem:
        raise RuntimeError(problem)
    return {}


def check_sdxl_lora_text_encoders(work: Path, gpu: bool) -> dict[str, Any]:
    """SDXL LoRA with both text encoders trained at 1024 px: latents cached (the VAE in fp32 at
    1024 px), one fp16 sample decoded at the end (the fp32 VAE outside autocast), the kohya and
    diffusers LoRA files written."""
    model = build_sdxl(work / "sdxl", gpu=gpu)
    resolution = 1024 if gpu else 64
    spec = _manifest(
        work,
        "sdxl",
        model=model,
        method="LoRA",
        resolution=resolution,
        mixedPrecision="fp16",
        preferBf16=False,
        optimizer="AdamW8bit" if gpu else "AdamW",
        cacheLatents=True,
        lora={"rank": 4, "alpha": 4, "trainTextEncoder": True},
        samples={"prompts": [PROMPT], "numInferenceSteps": 2},
    )
    summary = _train(work, "sdxl-te", spec)
    sample = Path(summary["output"]["samples"][0]) if summary.get("output", {}).get("samples") else None
    return {**_picture_check(work / "out-sdxl-te"), "sample": str(sample or "")}


def check_flux_nf4_folder(work: Path, gpu: bool) -> dict[str, Any]:
    """Flux.1 LoRA on the attention projections with an nf4 base read from a diffusers folder;
    the kohya/ComfyUI file (fused q, k, v with zero parts beside the trained ones) written."""
    model = build_flux(work / "flux", gpu=gpu)
    spec = _flux_manifest(work, model=model.as_uri(), gpu=gpu)
    summary = _train(work, "flux-folder", spec)
    return {**_kohya_check(work / "out-flux-folder"), "settings": _short(summary)}


def check_flux_nf4_single_file(work: Path, gpu: bool) -> dict[str, Any]:
    """The same from the single file people keep (flux1-dev.safetensors' layout), with the
    other parts from the folder (componentsUri)."""
    from finetune_trainer.tiny import write_flux_single_file

    model = build_flux(work / "flux", gpu=gpu)
    single = write_flux_single_file(model, work / "flux1-check.safetensors")
    spec = _flux_manifest(work, model=single.as_uri(), gpu=gpu, components=model.as_uri())
    summary = _train(work, "flux-file", spec)
    return {**_kohya_check(work / "out-flux-file"), "settings": _short(summary)}


def check_compile(work: Path, gpu: bool) -> dict[str, Any]:
    """SD 1.5's UNet under torch.compile (inductor), fused AdamW, channels_last, for 3 steps."""
    from finetune_trainer.tiny import build_random_pipeline, build_tiny_pipeline

    if not gpu:
        return {"skipped": "inductor on a CPU compiles for minutes; this check is for a GPU"}
    folder = work / "sd15"
    model = build_random_pipeline(folder, model_type="v1x") if gpu else build_tiny_pipeline(folder)
    spec = _manifest(
        work,
        "v1x",
        model=model,
        resolution=512 if gpu else 64,
        mixedPrecision="bf16" if gpu else "no",
        optimizer="AdamW",
        compile=True,
        maxSteps=3,
    )
    summary = _train(work, "compile", spec)
    if summary.get("settings", {}).get("compile") != "true":
        raise RuntimeError(f"compile was not in effect: {summary.get('warnings')}")
    return {"settings": _short(summary)}


CHECKS = [
    Check("precision", "bf16/fp16 choice and one convolution under autocast", check_precision, 120),
    Check("adamw8bit", "one step of bitsandbytes' AdamW8bit on the GPU", check_adamw8bit, 120),
    Check("xformers", "xformers' memory-efficient attention, where installed", check_xformers, 120),
    Check(
        "sdxl-lora-te",
        "SDXL LoRA + both text encoders at 1024 px, latents cached, fp16 sample, kohya export",
        check_sdxl_lora_text_encoders,
        240,
    ),
    Check(
        "flux-nf4-folder",
        "Flux.1 LoRA (attention targets) on an nf4 base from a folder, kohya export",
        check_flux_nf4_folder,
        240,
    ),
    Check(
        "flux-nf4-single-file",
        "the same from a single-file transformer with componentsUri",
        check_flux_nf4_single_file,
        240,
    ),
    Check("compile", "SD 1.5 UNet under torch.compile, fused AdamW", check_compile, 300),
]


# --- models of the real widths ----------------------------------------------------------------------


def build_sdxl(dest: Path, *, gpu: bool) -> Path:
    """SDXL's widths with the depth cut (``tiny.build_random_pipeline(shallow=True)``), built on
    the GPU; on a CPU the tiny SDXL pipeline."""
    from finetune_trainer.tiny import build_random_pipeline, build_tiny_sdxl_pipeline

    if (dest / "model_index.json").is_file():
        return dest
    return build_random_pipeline(dest, model_type="sdxl", shallow=True) if gpu else build_tiny_sdxl_pipeline(dest)


def build_flux(dest: Path, *, gpu: bool) -> Path:
    """Flux.1-dev's widths with the depth cut, in bf16, built on the GPU; on a CPU the tiny Flux.1."""
    from finetune_trainer.tiny import build_random_pipeline, build_tiny_flux_pipeline

    if (dest / "model_index.json").is_file():
        return dest
    return build_random_pipeline(dest, model_type="flux1", shallow=True) if gpu else build_tiny_flux_pipeline(dest)


# --- runs ---------------------------------------------------------------------------------------------


def _photos(work: Path, size: int) -> Path:
    from finetune_trainer.tiny import write_demo_images

    folder = work / f"photos-{size}"
    if not folder.is_dir():
        write_demo_images(folder, 2, size)
    return folder


def _manifest(
    work: Path,
    model_type: str,
    *,
    model: Path | str,
    method: str = "LoRA",
    resolution: int = 64,
    samples: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    components: str | None = None,
    **training: Any,
) -> dict[str, Any]:
    uri = model.as_uri() if isinstance(model, Path) else model
    base: dict[str, Any] = {"uri": uri, "type": model_type}
    if components:
        base["componentsUri"] = components
    spec: dict[str, Any] = {
        "method": method,
        "baseModel": base,
        "dataset": {
            "instanceImages": _photos(work, max(resolution, 64)).as_uri(),
            "instancePrompt": PROMPT,
            "resolution": resolution,
            "centerCrop": True,
        },
        "training": {"maxSteps": 2, "learningRate": 1.0e-4, "seed": 0, **training},
        "output": {"uri": (work / "out").as_uri(), "halfPrecision": True},
    }
    if lora:
        spec["training"]["lora"] = lora
    if samples:
        spec["samples"] = samples
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "check"}, "spec": spec}


def _flux_manifest(work: Path, *, model: str, gpu: bool, components: str | None = None) -> dict[str, Any]:
    return _manifest(
        work,
        "flux1",
        model=model,
        components=components,
        resolution=512 if gpu else 64,
        mixedPrecision="bf16" if gpu else "no",
        optimizer="AdamW8bit" if gpu else "AdamW",
        baseQuantization="nf4",
        lora={"rank": 4, "alpha": 4, "targets": "attention"},
    )


def _train(work: Path, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``finetune-trainer run`` on the manifest, in this process; the summary it ends with."""
    import yaml

    from finetune_trainer import cli

    output = work / f"out-{name}"
    manifest["spec"]["output"]["uri"] = output.as_uri()
    manifest["metadata"]["name"] = name
    job = work / f"{name}.yaml"
    job.write_text(yaml.safe_dump(manifest))
    log = work / f"{name}-termination-log"
    os.environ["FINETUNE_TERMINATION_LOG"] = str(log)
    os.environ.pop("FINETUNE_REPORT_URL", None)
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        code = cli.main(["run", str(job)])
    (work / f"{name}.log").write_text(lines.getvalue())
    summary = dict(json.loads(log.read_text())) if log.exists() else {}
    if code != 0:
        raise RuntimeError(f"the run ended with exit code {code}: {summary.get('message') or lines.getvalue()[-600:]}")
    return summary


def _picture_check(output: Path) -> dict[str, Any]:
    """The newest sample is a picture, not one flat colour (black: a VAE that overflowed)."""
    import numpy
    from PIL import Image

    pictures = sorted((output / "samples").glob("*.png"))
    if not pictures:
        raise RuntimeError(f"no sample was written in {output / 'samples'}")
    pixels = numpy.asarray(Image.open(pictures[-1]).convert("RGB"), dtype=numpy.int16)
    spread = int(pixels.max() - pixels.min())
    if spread <= 2:
        raise RuntimeError(f"{pictures[-1].name} is one flat colour ({pixels.mean():.0f}): the VAE overflowed")
    return {"sample_spread": spread}


def _kohya_check(output: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = [p for p in output.glob("*.safetensors") if p.is_file()]
    if not files:
        raise RuntimeError(f"no kohya LoRA file in {output}")
    with safe_open(str(files[0]), framework="pt") as handle:
        keys = set(handle.keys())
    fused = [k for k in keys if "img_attn_qkv" in k]
    if not fused:
        raise RuntimeError(f"{files[0].name} has no fused q, k, v layer (lora_unet_double_blocks_*_img_attn_qkv)")
    return {"kohya_keys": len(keys)}


def _short(summary: dict[str, Any]) -> str:
    settings = summary.get("settings", {})
    keys = ("mixed_precision", "optimizer", "attention", "base_quantization", "compile")
    return ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)


# --- the harness ----------------------------------------------------------------------------------------


def child(name: str, work: Path, gpu: bool) -> None:
    check = next(c for c in CHECKS if c.name == name)
    started = time.perf_counter()
    result: dict[str, Any] = {"name": name}
    try:
        if gpu:
            import torch

            torch.cuda.reset_peak_memory_stats()
        result["notes"] = check.run(work, gpu)
        result["outcome"] = "skipped" if "skipped" in result["notes"] else "passed"
    except BaseException as exc:  # a check's failure is its result
        result["outcome"] = "failed"
        result["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
        result["traceback"] = traceback.format_exc()[-3000:]
    result["seconds"] = round(time.perf_counter() - started, 1)
    if gpu:
        import torch

        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(result, default=str))


def run_check(check: Check, work: Path, gpu: bool) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", check.name, "--work", str(work), *(["--cpu"] if not gpu else [])],
            env=env,
            capture_output=True,
            text=True,
            timeout=check.timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"name": check.name, "outcome": "failed", "error": f"did not finish in {check.timeout_s} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    return {"name": check.name, "outcome": "failed", "error": f"exit {done.returncode}: {done.stderr[-800:]}"}


def markdown(device: str, results: list[dict[str, Any]]) -> str:
    lines = [
        "# GPU check",
        "",
        f"`make gpu-check` on {device}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
        "(bench/gpu_check.py says what each check runs).",
        "",
        "| check | what | outcome | peak GPU memory | seconds | notes |",
        "|---|---|---|---|---|---|",
    ]
    what = {c.name: c.what for c in CHECKS}
    for r in results:
        notes = r.get("error") or ", ".join(f"{k}: {v}" for k, v in (r.get("notes") or {}).items())
        peak = f"{r['peak_gib']} GiB" if "peak_gib" in r else "-"
        notes = str(notes).replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r['name']} | {what.get(r['name'], '')} | {r['outcome']} | {peak} | {r.get('seconds', '-')} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on tiny models on this CPU")
    parser.add_argument("--only", action="append", default=[], help="run only this check (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.work), gpu=not args.cpu)
        return 0
    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    checks = [c for c in CHECKS if not args.only or c.name in args.only]
    if not gpu and not args.cpu:
        print("No GPU here: make gpu-check would run, on one GPU, each in a process of its own:")
        for check in checks:
            print(f"  {check.name:22s} {check.what} (at most {check.timeout_s} s)")
        print(f"in at most {sum(c.timeout_s for c in checks) // 60} minutes, and write {RESULTS / 'gpu-check.md'}.")
        print("GPU_CHECK_ARGS=--cpu runs the same checks on tiny models on this CPU.")
        return 0
    device = torch.cuda.get_device_name(0) if gpu else "this CPU (tiny models)"
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for check in checks:
            print(f"{check.name}: {check.what} ...", flush=True)
            result = run_check(check, Path(tmp), gpu)
            print(f"  {result['outcome']} ({result.get('seconds', '-')} s) {result.get('error', '')}", flush=True)
            if result["outcome"] == "failed" and result.get("traceback"):
                print(result["traceback"], flush=True)
            results.append(result)
    if gpu:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gpu-check.json").write_text(json.dumps({"device": device, "results": results}, indent=1) + "\n")
        (RESULTS / "gpu-check.md").write_text(markdown(device, results))
        print(f"wrote {RESULTS / 'gpu-check.md'}")
    failed = [r["name"] for r in results if r["outcome"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
