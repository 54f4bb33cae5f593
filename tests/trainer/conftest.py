"""Fixtures for the trainer tests: a tiny random pipeline and a few photos, built offline once
per session, and a helper that writes a FineTuneJob manifest the way a user would."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_trainer import cli

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    import torch

    # The tiny model gains little from a second thread, and on a shared machine idle
    # OpenMP threads spin: one thread is the fastest under load.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import write_demo_images

    folder = tmp_path_factory.mktemp("photos") / "subject"
    write_demo_images(folder, 4, 72)
    return folder


def manifest(path: Path, *, name: str = "tiny", **spec: Any) -> Path:
    """Write a FineTuneJob manifest (camelCase, as a user writes it) and return its path."""
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        )
    )
    return path


def base_spec(model: Path, photos: Path, output: Path, **training: Any) -> dict[str, Any]:
    return {
        "baseModel": {"uri": model.as_uri(), "type": "v1x"},
        "dataset": {"instanceImages": photos.as_uri(), "instancePrompt": "a photo of sks ball", "resolution": 64},
        "training": {"maxSteps": 2, "learningRate": 1.0e-3, "optimizer": "AdamW", "mixedPrecision": "no", **training},
        "output": {"uri": output.as_uri(), "halfPrecision": False},
    }


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(path))
    monkeypatch.delenv("FINETUNE_REPORT_URL", raising=False)
    yield path


@dataclass
class Run:
    code: int
    output: Path
    lines: list[dict[str, Any]]
    summary: dict[str, Any]

    def events(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == "progress"]


def run_cli(job: Path, output: Path, termination_log: Path, **env: str) -> Run:
    """``finetune-trainer run JOB`` in this process, its JSON log lines captured."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_TERMINATION_LOG", str(termination_log))
        patch.delenv("FINETUNE_REPORT_URL", raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        with contextlib.redirect_stdout(stdout):
            code = cli.main(["run", str(job)])
    summary = json.loads(termination_log.read_text()) if termination_log.exists() else {}
    return Run(code=code, output=output, lines=json_lines(stdout.getvalue()), summary=summary)


# Runs the trainer's real command line, but dies by SIGKILL in the middle of saving the
# checkpoint at KILL_AT: the accelerate state is written, the checkpoint is not yet renamed
# into place.  Nothing in the trainer knows about this.
KILL_WHILE_CHECKPOINTING = textwrap.dedent(
    """
    import os, signal, sys
    from finetune_trainer import checkpoints, cli, storage

    KILL_AT = int(sys.argv.pop(1))
    real_save = checkpoints.save

    def save(accelerator, root, *, step, state, keep_last, **extra):
        if step == KILL_AT:
            tmp = root / (storage.TEMP_PREFIX + checkpoints.checkpoint_name(step))
            tmp.mkdir(parents=True)
            accelerator.save_state(str(tmp))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(accelerator, root, step=step, state=state, keep_last=keep_last, **extra)

    checkpoints.save = save
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def run_script(script: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in a child process (its own termination log, no report URL);
    ``subprocess.run`` kills it if it outlives the timeout, so no trainer is left running."""
    path = tmp_path / "script.py"
    path.write_text(script)
    child_env = {
        **os.environ,
        "FINETUNE_TERMINATION_LOG": str(tmp_path / "killed-log"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    child_env.pop("FINETUNE_REPORT_URL", None)
    return subprocess.run(
        [sys.executable, str(path), *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run_killed_while_checkpointing(
    job: Path, tmp_path: Path, *, step: int, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_script(KILL_WHILE_CHECKPOINTING, [str(step), "run", str(job)], tmp_path, **env)


def killed_and_resumed(job: Path, output: Path, tmp_path: Path, *, kill_at: int, resume_from: int) -> Run:
    """The job killed while it saves the checkpoint of step ``kill_at``, then run again: it
    resumes from ``resume_from`` (the checkpoint before) and succeeds."""
    killed = run_killed_while_checkpointing(job, tmp_path, step=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(job, output, tmp_path / "termination-log")
    assert resumed.code == 0, resumed.summary
    training = [e for e in resumed.events() if e["stage"] == "training"]
    assert training[0]["message"] == f"training from step {resume_from} to {kill_at}"
    return resumed


def run_watching_the_export(job: Path, output: Path, root: Path, watch: Callable[[Any], None]) -> Run:
    """``run_cli``, with ``watch`` handed the trained models (export.Trained) just before the
    exports are made from them: what the run ended with, for a test to compare a loader's
    result against."""
    from finetune_trainer import export

    export_all = export.export_all

    def watching(trained: Any, *args: Any, **kwargs: Any) -> Any:
        watch(trained)
        return export_all(trained, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "export_all", watching)
        run = run_cli(job, output, root / "termination-log")
    assert run.code == 0, run.summary
    return run


def sd_pipeline(model: Path) -> Any:
    """The tiny SD pipeline in fp32, quiet."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoded(pipe: Any, prompt: str) -> Any:
    """The prompt's text-encoder output as generation sees it (a learned word expanded into its
    vectors' tokens by the pipeline's maybe_convert_prompt)."""
    import torch

    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)[0]
