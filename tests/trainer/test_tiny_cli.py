"""``finetune-trainer tiny DEST``: the tiny random pipeline and the pictures `make demo` trains on,
written through the trainer's CLI (the demo starts the trainer only that way)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.trainer


def test_tiny_writes_the_seeded_pipeline_and_the_pictures_the_demo_uses(tiny_model: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    command = shutil.which("finetune-trainer", path=str(Path(sys.executable).parent))
    assert command is not None, "the finetune-trainer script is not installed beside this Python"
    dest = tmp_path / "demo"
    argv = [command, "tiny", str(dest), "--images", "3", "--size", "48"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert str(dest / "model") in result.stdout

    written = StableDiffusionPipeline.from_pretrained(dest / "model")
    # The same random weights as build_tiny_pipeline(seed=0), which the demo called in-process before.
    expected = StableDiffusionPipeline.from_pretrained(tiny_model)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(written, name).state_dict(), getattr(expected, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name

    pictures = sorted((dest / "images").iterdir())
    assert [p.suffix for p in pictures] == [".png", ".jpg", ".png"]
    assert {Image.open(p).size for p in pictures} == {(48, 48)}
    # A trainer pod reads them as uid 1000 on a real node: safetensors' own 0600 failed there with
    # "Permission denied: '.../unet/diffusion_pytorch_model.safetensors'".
    unreadable = [str(p) for p in dest.rglob("*") if p.stat().st_mode & 0o444 != 0o444]
    assert unreadable == []


def test_tiny_writes_a_job_that_run_trains_as_is(tmp_path: Path) -> None:
    import json

    import yaml

    command = shutil.which("finetune-trainer", path=str(Path(sys.executable).parent))
    assert command is not None
    dest = tmp_path / "demo"
    made = subprocess.run([command, "tiny", str(dest)], capture_output=True, text=True, timeout=600, check=False)
    assert made.returncode == 0, made.stderr
    assert f"finetune-trainer run {dest / 'job.yaml'}" in made.stdout
    job = yaml.safe_load((dest / "job.yaml").read_text())
    job["spec"]["training"]["maxSteps"] = 2  # what this check needs; the file's own 20 take seconds more
    job["spec"]["samples"]["everySteps"] = 0
    (dest / "short.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "summary")}
    env.pop("FINETUNE_REPORT_URL", None)
    argv = [command, "run", str(dest / "short.yaml")]
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert json.loads((tmp_path / "summary").read_text())["phase"] == "Succeeded"
    assert (dest / "output" / "tiny.safetensors").is_file()


def test_matplotlib_keeps_its_folders_in_the_temporary_folder_on_a_read_only_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer import pictures

    for variable in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    pictures.matplotlib_home()
    assert "MPLCONFIGDIR" not in os.environ  # a home it can write: matplotlib's own folders
    # A home where nothing can be made (a pod's read-only root): the temporary folder.
    monkeypatch.setenv("HOME", "/proc/self/no-home")
    pictures.matplotlib_home()
    assert os.environ["MPLCONFIGDIR"] == os.path.join(tempfile.gettempdir(), "matplotlib")
