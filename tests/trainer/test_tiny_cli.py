"""``finetune-trainer tiny DEST``: the tiny random pipeline and the pictures `make demo` trains on,
written through the trainer's CLI (the demo starts the trainer only that way)."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
