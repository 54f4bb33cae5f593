"""Data parallelism for real: two worker processes (gloo on the CPU, started by the trainer's
own launcher) train what one process trains with the doubled batch, and a worker killed
mid-run ends the run as a transient failure that the next attempt resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from finetune_api.report import ExitCode
from tests.trainer.conftest import base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer

STEPS = 4
LEARNING_RATE = 1.0e-3  # base_spec's


def _spec(model: Path, photos: Path, output: Path, *, batch: int, gpus: int, **training: Any) -> dict[str, Any]:
    spec = base_spec(model, photos, output, maxSteps=STEPS, batchSize=batch, seed=21, **training)
    spec["dataset"].update(randomFlip=True)  # per-example draws must line up too
    spec["resources"] = {"gpus": gpus}
    return spec


def _worker_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_REPORT_URL", None)
    return env


def _launch(job: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    """``finetune-trainer run``'s own launcher with two CPU workers, in a process of its own."""
    code = (
        "import sys; from pathlib import Path; from finetune_trainer import launch; "
        "sys.exit(launch.launch_workers(Path(sys.argv[1]), 2, cpu=True))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(job)],
        env=_worker_env(tmp_path),
        stdout=open(tmp_path / "launcher.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def _state(output: Path, step: int) -> dict[str, Any]:
    path = output / "checkpoints" / f"checkpoint-{step:06d}" / "trainer_state.json"
    return dict(json.loads(path.read_text()))


def test_two_processes_train_what_one_trains_with_the_doubled_batch(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    one = run_cli(
        manifest(tmp_path / "one.yaml", name="dp", **_spec(tiny_model, photos, one_out, batch=2, gpus=1)),
        one_out,
        tmp_path / "one-log",
    )
    assert one.code == ExitCode.SUCCESS, one.summary

    launcher = _launch(
        manifest(tmp_path / "two.yaml", name="dp", **_spec(tiny_model, photos, two_out, batch=1, gpus=2)), tmp_path
    )
    assert launcher.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["phase"] == "Succeeded"
    assert summary["settings"]["processes"] == "2"
    assert int(summary["settings"]["barrier_timeout_s"]) >= 1800

    # The loss each step reports is the whole micro-batch's: the mean over both processes.
    ones = [h[1] for h in _state(one_out, STEPS)["loss_history"]]
    twos = [h[1] for h in _state(two_out, STEPS)["loss_history"]]
    assert len(ones) == len(twos) == STEPS
    torch.testing.assert_close(torch.tensor(twos), torch.tensor(ones), rtol=1e-4, atol=1e-6)
    # The same weights: gradients averaged over the processes are the doubled batch's gradient.
    # (Summed in another order, they differ in the last bits, which AdamW's normalisation
    # magnifies where a gradient is near zero: the updates are compared, to 1% of their size.)
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(one_out / "checkpoints" / f"checkpoint-{STEPS:06d}" / "model.safetensors"))
    ours = load_file(str(two_out / "checkpoints" / f"checkpoint-{STEPS:06d}" / "model.safetensors"))
    assert ours.keys() == theirs.keys() == base.keys()
    update = torch.cat([(theirs[k] - base[k]).flatten() for k in base])
    difference = torch.cat([(ours[k] - theirs[k]).flatten() for k in base])
    assert float(update.norm()) > 0.01
    assert float(difference.norm() / update.norm()) < 0.01
    assert float(difference.abs().max()) < 0.1 * LEARNING_RATE  # a tenth of one step's largest move


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children + [d for c in children for d in _descendants(c)]


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


def test_a_killed_worker_fails_the_run_as_transient_and_the_next_attempt_resumes(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    spec = _spec(tiny_model, photos, output, batch=1, gpus=2)
    spec["training"]["maxSteps"] = 60
    spec["checkpoints"] = {"everySteps": 3, "keepLast": 1}
    job = manifest(tmp_path / "job.yaml", name="dp-kill", **spec)
    launcher = _launch(job, tmp_path)
    try:
        # Wait for training to be under way: a checkpoint, as progress, not a time guess.
        checkpoints = output / "checkpoints"
        deadline = time.monotonic() + 300
        while launcher.poll() is None and time.monotonic() < deadline:
            if any((c / "trainer_state.json").is_file() for c in checkpoints.glob("checkpoint-*")):
                break
            time.sleep(0.05)
        assert launcher.poll() is None, "the run ended before a worker could be killed"
        (victim,) = [pid for pid in _descendants(launcher.pid) if _rank_of(pid) == "1"]
        os.kill(victim, signal.SIGKILL)
        code = launcher.wait(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code == ExitCode.ERROR, "a lost worker is transient: retried, not failed for good"
    resumed_from = max(int(c.name.split("-")[1]) for c in (output / "checkpoints").glob("checkpoint-*"))
    assert 0 < resumed_from < 60

    # The next attempt (a new pod) picks the run up from its checkpoint.
    (tmp_path / "launcher.log").unlink()
    rerun = _launch(job, tmp_path)
    assert rerun.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "launcher.log").read_text().splitlines() if x.startswith("{")]
    messages = [x.get("message") for x in lines if x.get("event") == "progress" and x.get("stage") == "training"]
    assert messages[0] == f"training from step {resumed_from} to 60"
    assert _state(output, 60)["step"] == 60


def test_two_processes_train_sdxl_lora_with_its_text_encoders(
    photos: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SDXL LoRA with text-encoder adapters on two processes: SDXL conditions on the first
    encoder's second-to-last layer, so its last layer's adapters never get a gradient, and DDP
    without ``find_unused_parameters`` waits for them and stops at the second step (as
    diffusers' SDXL and Flux scripts know, who pass it)."""
    from finetune_trainer.tiny import build_tiny_sdxl_pipeline

    model = build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl-dp") / "model", seed=0)
    output = tmp_path / "xl"
    spec = _spec(model, photos, output, batch=1, gpus=2)
    spec["baseModel"]["type"] = "sdxl"
    spec["method"] = "LoRA"
    spec["training"]["lora"] = {"rank": 4, "alpha": 4, "trainTextEncoder": True}
    launcher = _launch(manifest(tmp_path / "xl.yaml", name="dp-xl", **spec), tmp_path)
    assert launcher.wait(timeout=600) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert (summary["phase"], summary["settings"]["processes"]) == ("Succeeded", "2")
    assert len(_state(output, STEPS)["loss_history"]) == STEPS
