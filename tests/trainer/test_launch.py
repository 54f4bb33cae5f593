"""Several GPUs: the run's exit code still says bad input or out of memory, not just "failed"."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from finetune_api.report import ExitCode
from finetune_trainer import launch

pytestmark = pytest.mark.trainer


@pytest.mark.parametrize(
    ("codes", "launcher", "expected"),
    [
        ([0, 0], 0, ExitCode.SUCCESS),
        ([2, 2], 1, ExitCode.BAD_INPUT),
        ([0, 3], 1, ExitCode.OUT_OF_MEMORY),
        ([2, 3], 1, ExitCode.OUT_OF_MEMORY),
        ([1], 1, ExitCode.ERROR),
        ([], -9, -9),  # the launcher was killed: its own code, still a retry
        ([0], 0, ExitCode.SUCCESS),
        ([0], 1, ExitCode.ERROR),
    ],
)
def test_the_most_telling_exit_code_wins(codes: list[int], launcher: int, expected: int) -> None:
    assert launch.combine(codes, launcher) == expected


def test_workers_bad_input_survives_a_launcher_that_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for torchrun: start two workers of the real command line, then exit 1
    because one failed, as torchrun does."""
    job = tmp_path / "job.yaml"
    job.write_text(
        "kind: FineTuneJob\nspec:\n  baseModel: {uri: /m}\n  dataset: {instanceImages: /d, instancePrompt: p}\n"
        "  training: {maxSteps: 1, batchSize: 0}\n  output: {uri: /o}\n  resources: {gpus: 2}\n"
    )
    fake_launcher = textwrap.dedent(
        f"""
        import os, subprocess, sys
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "finetune_trainer", "run", {str(job)!r}],
                env={{**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}},
                stdout=subprocess.DEVNULL,
            )
            for rank in range(2)
        ]
        codes = [w.wait() for w in workers]
        sys.exit(0 if not any(codes) else 1)
        """
    )
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    code = launch.launch_workers(job, 2, command=[sys.executable, "-c", fake_launcher])
    assert code == ExitCode.BAD_INPUT
    assert "spec.training.batchSize" in (tmp_path / "termination-log").read_text()


def test_one_gpu_needs_no_launcher() -> None:
    assert launch.processes_for(1) == 1
    assert launch.processes_for(4) >= 1
