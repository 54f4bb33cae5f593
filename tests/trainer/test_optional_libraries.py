"""Optional libraries that cannot run are found before training, not at step 1: bitsandbytes
(and xformers on a GPU) are probed with one real operation, and a broken wheel falls back
with a warning on the resource.  Their import-time noise stays out of the run's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer.job import detect_device
from tests.trainer.conftest import base_spec, json_lines, manifest

pytestmark = pytest.mark.trainer

# What a wheel built for another CUDA does: the import fails in its native library.
BROKEN_AT_IMPORT = 'raise OSError("libcudart.so.13: cannot open shared object file: No such file or directory")\n'
# One that imports, and fails at its first kernel launch.
BROKEN_AT_STEP = textwrap.dedent(
    """
    class _AdamW8bit:
        def __init__(self, params, **options):
            self.params = list(params)

        def step(self):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    class optim:
        AdamW8bit = _AdamW8bit
    """
)


def _run(tmp_path: Path, spec: dict[str, object], *, fake: str | None = None) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    job = manifest(tmp_path / "job.yaml", name="probe", **spec)
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "log"), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_REPORT_URL", None)
    if fake is not None:
        package = tmp_path / "fake" / "bitsandbytes"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(fake)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "run", str(job)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return done.returncode, json.loads((tmp_path / "log").read_text()), done.stdout + done.stderr


@pytest.mark.parametrize(
    ("fake", "problem"), [(BROKEN_AT_IMPORT, "OSError: libcudart.so.13"), (BROKEN_AT_STEP, "RuntimeError: CUDA error")]
)
def test_a_bitsandbytes_that_cannot_run_here_falls_back_with_a_warning(
    fake: str, problem: str, tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    spec = base_spec(tiny_model, photos, tmp_path / "out", maxSteps=1, optimizer="AdamW8bit")
    code, summary, _ = _run(tmp_path, spec, fake=fake)
    assert code == 0, summary
    assert summary["settings"]["optimizer"] == "AdamW"
    (warning,) = [w for w in summary["warnings"] if w.startswith("spec.training.optimizer")]
    assert f"bitsandbytes, which is installed but does not work here ({problem}" in warning
    assert "using AdamW" in warning


def test_a_working_bitsandbytes_passes_its_probe_and_is_used() -> None:
    spec = parse_manifest(
        {
            "spec": {
                "baseModel": {"uri": "/m"},
                "dataset": {"instanceImages": "/d", "instancePrompt": "p"},
                "training": {"maxSteps": 1, "optimizer": "AdamW8bit"},
                "output": {"uri": "/o"},
            }
        }
    ).spec
    device = detect_device(spec)
    assert device.bitsandbytes, device.bitsandbytes_problem  # bitsandbytes' 8-bit AdamW runs on CPUs


def test_library_noise_stays_out_of_a_runs_output(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    spec = base_spec(tiny_model, photos, tmp_path / "out", maxSteps=1, optimizer="AdamW8bit")
    spec["samples"] = {"prompts": ["a photo of sks ball"], "numInferenceSteps": 1}  # loads a pipeline
    code, summary, output = _run(tmp_path, spec)
    assert code == 0, summary
    assert summary["settings"]["optimizer"] == "AdamW8bit"
    assert "gemm_4bit_forward" not in output
    assert "requires torchvision" not in output
    assert json_lines(output), "the run's own log lines are still there"
