"""Fixtures for the trainer tests: a tiny random pipeline and a few photos, built offline once
per session, and a helper that writes a FineTuneJob manifest the way a user would."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
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
