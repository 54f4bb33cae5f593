"""An output folder belongs to one job and one dataset: a re-run never returns an old model.

Changed photos, a re-created FineTuneJob (another uid) and a second writer at the same time
each either train from step 0 into a fresh output or are refused with BadInput naming
spec.output.uri; nothing of the old output is ever deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.report import ExitCode
from finetune_trainer import ownership
from tests.trainer.conftest import Run, base_spec, manifest, run_cli

pytestmark = pytest.mark.trainer


def _job(path: Path, spec: dict[str, Any], *, name: str = "owned", uid: str | None = None) -> Path:
    manifest(path, name=name, **spec)
    if uid is not None:  # what the operator's job file carries
        data = yaml.safe_load(path.read_text())
        data["metadata"]["uid"] = uid
        path.write_text(yaml.safe_dump(data))
    return path


def _trained_steps(run: Run) -> list[int]:
    return sorted({e["step"] for e in run.events() if e["stage"] == "training" and e.get("loss") is not None})


def _listing(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ownership.LOCK_FILE
    }


@pytest.fixture
def first(tiny_model: Path, photos: Path, tmp_path: Path) -> tuple[dict[str, Any], Path, Run]:
    output = tmp_path / "out"
    spec = base_spec(tiny_model, photos, output, maxSteps=2)
    run = run_cli(_job(tmp_path / "job.yaml", spec, uid="uid-1"), output, tmp_path / "log-1")
    assert run.code == ExitCode.SUCCESS, run.summary
    assert _trained_steps(run)[-1] == 2
    record = json.loads((output / ownership.OWNER_FILE).read_text())
    assert record["owner"] == "uid:uid-1"
    assert not (output / ownership.LOCK_FILE).exists(), "the lock is freed at the end"
    return spec, output, run


def test_the_same_job_again_resumes_its_own_final_checkpoint(
    first: tuple[dict[str, Any], Path, Run], tmp_path: Path
) -> None:
    spec, output, _ = first
    again = run_cli(_job(tmp_path / "again.yaml", spec, uid="uid-1"), output, tmp_path / "log-2")
    assert again.code == ExitCode.SUCCESS, again.summary
    assert _trained_steps(again) == []  # its own run, complete: exported again, not trained


def test_a_recreated_job_is_refused_or_trains_afresh_with_overwrite(
    first: tuple[dict[str, Any], Path, Run], tmp_path: Path
) -> None:
    spec, output, _ = first
    before = _listing(output)
    refused = run_cli(_job(tmp_path / "new.yaml", spec, uid="uid-2"), output, tmp_path / "log-2")
    assert refused.code == ExitCode.BAD_INPUT
    message = refused.summary["message"]
    assert message.startswith("spec.output.uri: "), message
    assert "FineTuneJob owned (uid uid-1)" in message and "spec.output.overwrite: true" in message
    assert _listing(output) == before, "a refused job changes nothing in the output"

    spec["output"]["overwrite"] = True
    fresh = run_cli(_job(tmp_path / "new.yaml", spec, uid="uid-2"), output, tmp_path / "log-3")
    assert fresh.code == ExitCode.SUCCESS, fresh.summary
    assert "training from step 0 to 2" in {e.get("message") for e in fresh.events()}
    (aside,) = [p for p in output.iterdir() if p.name.startswith(ownership.REPLACED_PREFIX)]
    assert _listing(aside) == before, "the old run is kept whole, moved aside"
    assert json.loads((output / ownership.OWNER_FILE).read_text())["owner"] == "uid:uid-2"
    assert any("moved into .replaced-" in w for w in fresh.summary["warnings"])


def test_changed_photos_under_the_same_output_are_refused(
    first: tuple[dict[str, Any], Path, Run], photos: Path, tmp_path: Path
) -> None:
    spec, output, _ = first
    before = _listing(output)
    changed = tmp_path / "changed"
    shutil.copytree(photos, changed)
    first_image = sorted(p for p in changed.iterdir() if p.suffix in (".png", ".jpg"))[0]
    (first_image.with_suffix(".txt")).write_text("a photo of sks ball on grass")  # a new caption
    spec["dataset"]["instanceImages"] = changed.as_uri()
    # The same job (locally: the same name) pointed at a folder whose contents changed.
    refused = run_cli(_job(tmp_path / "job.yaml", spec, uid="uid-1"), output, tmp_path / "log-2")
    assert refused.code == ExitCode.BAD_INPUT
    assert refused.summary["message"].startswith("spec.output.uri: ")
    assert "on other images" in refused.summary["message"]
    assert _trained_steps(refused) == []
    assert {k: v for k, v in _listing(output).items() if not k.startswith("class_images")} == before


def test_a_second_writer_is_refused_while_the_first_runs(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    long_spec = base_spec(tiny_model, photos, output, maxSteps=100000)
    job = _job(tmp_path / "long.yaml", long_spec, name="first-writer")
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "long-log"), "OMP_NUM_THREADS": "1"}
    env.pop("FINETUNE_REPORT_URL", None)
    writer = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer", "run", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = output / ownership.LOCK_FILE
        deadline = time.monotonic() + 240
        while not lock.is_file() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.is_file(), "the first writer never took the lock"
        second = run_cli(
            _job(tmp_path / "second.yaml", base_spec(tiny_model, photos, output, maxSteps=2), name="second"),
            output,
            tmp_path / "log-2",
        )
        assert second.code == ExitCode.BAD_INPUT
        assert "is being written by the job named first-writer" in second.summary["message"]
        assert second.summary["message"].startswith("spec.output.uri: ")
        assert writer.poll() is None, "the refused writer disturbed the first one"
    finally:
        writer.kill()
        writer.wait()


def test_a_stale_lock_of_a_writer_that_is_gone_is_taken_over(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    lock = output / ownership.LOCK_FILE
    lock.write_text(json.dumps({"owner": "uid:gone", "name": "gone", "attempt": "gone-pod", "host": "x", "pid": 1}))
    fresh = time.time() - 10
    os.utime(lock, (fresh, fresh))
    spec = base_spec(tiny_model, photos, output, maxSteps=1)
    refused = run_cli(_job(tmp_path / "job.yaml", spec), output, tmp_path / "log-1")
    assert refused.code == ExitCode.BAD_INPUT, "a freshly refreshed lock holds"

    stale = time.time() - ownership.STALE_AFTER_S - 5
    os.utime(lock, (stale, stale))
    run = run_cli(_job(tmp_path / "job.yaml", spec), output, tmp_path / "log-2")
    assert run.code == ExitCode.SUCCESS, run.summary
    assert not lock.exists()


def test_temporary_checkpoint_names_differ_between_writers() -> None:
    a = ownership.Identity(owner="uid:a", name="a", attempt="pod-a", host="h", pid=1)
    b = ownership.Identity(owner="uid:b", name="b", attempt="pod-b", host="h", pid=1)
    retry = ownership.Identity(owner="uid:a", name="a", attempt="pod-a-2", host="h", pid=1)
    rank = ownership.Identity(owner="uid:a", name="a", attempt="pod-a", host="h", pid=2)
    assert len({a.token, b.token, retry.token}) == 3
    assert rank.token == a.token  # every process of one attempt writes into the same checkpoint
