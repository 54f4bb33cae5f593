"""Does the trainer, installed as a workstation user installs it, train today?

``make check-fresh-install``: ``pip install '.[trainer]'`` into a new virtual environment with
no constraints (whatever the package index resolves the ranges to today, as the README's
workstation install does), then, with that environment's ``finetune-trainer``, the tiny random
pipeline and a LoRA run on the UNet and the text encoder (the part a new transformers or peft
release broke before: transformers 5.24 and 5.25 ask for a peft that was not released).  It
prints what the ranges resolved to, and exits 1 naming what failed.  The packages come from
pip's cache after the first run; the environment is made in a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")
# What pyproject.toml builds the distribution from.
SOURCE = ("pyproject.toml", "README.md", "api", "operator", "trainer-image", "devcluster")
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")


def log(message: str) -> None:
    print(f"[fresh-install] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the environment and the run's folder")
    parser.add_argument(
        "--with",
        dest="extra",
        action="append",
        default=[],
        help="one more requirement for the resolution (e.g. transformers==5.25.0, to see what it does)",
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fresh-install-"))
    started = time.monotonic()
    try:
        env_dir = work / "venv"
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        # A copy of what the distribution is built from: setuptools leaves build/ beside the
        # source it builds, and a later build would take files deleted since from there.
        source = work / "source"
        source.mkdir()
        for part in SOURCE:
            if (ROOT / part).is_dir():
                shutil.copytree(ROOT / part, source / part, ignore=IGNORED)
            else:
                shutil.copy2(ROOT / part, source / part)
        log(f"pip install '.[trainer]' {' '.join(args.extra)} into {env_dir} (no constraints)")
        install = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"{source}[trainer]",
                *args.extra,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if install.returncode != 0:
            log(f"the install failed:\n{install.stderr[-3000:]}")
            return 1
        versions = subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
                *WATCHED,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        resolved = json.loads(versions.stdout)
        log("resolved: " + ", ".join(f"{k} {v}" for k, v in resolved.items()))
        trainer = env_dir / "bin" / "finetune-trainer"
        demo = work / "tiny"
        subprocess.run([str(trainer), "tiny", str(demo)], capture_output=True, text=True, check=True)
        job = _lora_job(demo)
        environment = {**os.environ, "FINETUNE_TERMINATION_LOG": str(work / "summary.json")}
        environment.pop("FINETUNE_REPORT_URL", None)
        environment.pop("PYTHONPATH", None)
        log("finetune-trainer run: LoRA on the UNet and the text encoder, 2 steps")
        run = subprocess.run(
            [str(trainer), "run", str(job)], capture_output=True, text=True, env=environment, check=False
        )
        summary = json.loads((work / "summary.json").read_text()) if (work / "summary.json").is_file() else {}
        if run.returncode != 0 or summary.get("phase") != "Succeeded":
            log(
                f"the LoRA run failed with {', '.join(f'{k} {v}' for k, v in resolved.items())}: "
                f"{summary.get('message') or run.stderr[-2000:] or run.stdout[-2000:]}"
            )
            return 1
        written = sorted(p.name for p in (demo / "output").iterdir())
        if "tiny-lora.safetensors" not in written:
            log(f"the run ended but wrote no LoRA file (wrote {written})")
            return 1
        log(f"passed in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _lora_job(demo: Path) -> Path:
    import yaml

    job = yaml.safe_load((demo / "job.yaml").read_text())
    job["spec"]["method"] = "LoRA"
    job["spec"]["training"].update(maxSteps=2, lora={"rank": 4, "alpha": 4, "trainTextEncoder": True})
    job["spec"]["checkpoints"] = {"everySteps": 0}
    job["spec"].pop("samples", None)
    path = demo / "lora.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


if __name__ == "__main__":
    sys.exit(main())
