"""Checkpoints are whole or invisible, the newest complete one wins, old ones are pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_api.v1alpha1 import parse_manifest
from finetune_trainer import checkpoints, storage
from finetune_trainer.errors import BadInput

pytestmark = pytest.mark.trainer


class FakeAccelerator:
    """What checkpoints.save needs from accelerate: a state that lands in a folder."""

    is_main_process = True

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.fail:
            raise OSError("disk full")


def _save(root: Path, step: int, *, keep_last: int = 2, fail: bool = False) -> checkpoints.Checkpoint:
    return checkpoints.save(
        FakeAccelerator(fail=fail), root, step=step, state={"step": step, "fingerprint": "f"}, keep_last=keep_last
    )


def test_newest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path: Path) -> None:
    for step in (100, 200, 300):
        _save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000200", "checkpoint-000300"]
    newest = checkpoints.newest(tmp_path)
    assert newest is not None
    assert newest.step == 300
    assert json.loads((newest.path / checkpoints.STATE_FILE).read_text())["step"] == 300


def test_a_failed_save_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path: Path) -> None:
    _save(tmp_path, 100, keep_last=1)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 200, keep_last=1, fail=True)
    newest = checkpoints.newest(tmp_path)
    assert newest is not None
    assert newest.step == 100
    assert not (tmp_path / "checkpoint-000200").exists()
    # What the failed save left is hidden, and removed by the next start.
    leftovers = storage.remove_temporaries(tmp_path)
    assert [p.name for p in leftovers] == [".tmp-checkpoint-000200"]


def test_a_folder_without_its_state_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 100)
    (tmp_path / "checkpoint-000500").mkdir()
    (tmp_path / "checkpoint-000500" / "model.safetensors").write_bytes(b"half")
    newest = checkpoints.newest(tmp_path)
    assert newest is not None
    assert newest.step == 100


def test_checkpoints_of_another_run_are_refused() -> None:
    def spec(seed: int, every: int) -> object:
        return parse_manifest(
            {
                "spec": {
                    "baseModel": {"uri": "/m"},
                    "dataset": {"instanceImages": "/d", "instancePrompt": "p"},
                    "training": {"maxSteps": 10, "seed": seed},
                    "checkpoints": {"everySteps": every},
                    "output": {"uri": "/o"},
                }
            }
        ).spec

    same = checkpoints.training_fingerprint(spec(1, 5))  # type: ignore[arg-type]
    assert checkpoints.training_fingerprint(spec(1, 50)) == same  # type: ignore[arg-type]
    other = checkpoints.training_fingerprint(spec(2, 5))  # type: ignore[arg-type]
    theirs = checkpoints.Checkpoint(step=5, path=Path("/o/checkpoints/checkpoint-000005"), state={"fingerprint": other})
    with pytest.raises(BadInput, match=r"^spec\.output\.uri: .* different training settings"):
        checkpoints.check_compatible(theirs, fingerprint=same)


def test_fields_added_later_leave_fingerprints_of_earlier_checkpoints_alone() -> None:
    """A run checkpointed by an earlier trainer resumes after the trainer gains settings."""

    def spec(**training: object) -> object:
        return parse_manifest(
            {
                "spec": {
                    "baseModel": {"uri": "/models/sd", "type": "v1x"},
                    "dataset": {"instanceImages": "/data/nick", "instancePrompt": "a photo of nick"},
                    "training": {"stepsPerImage": 150, **training},
                    "output": {"uri": "/out"},
                }
            }
        ).spec

    # Computed by the trainer before preferBf16 and compileMode existed.
    assert checkpoints.training_fingerprint(spec()) == "a6efe1362f54bcf9"
    assert checkpoints.training_fingerprint(spec(preferBf16=False)) != "a6efe1362f54bcf9"
    assert checkpoints.training_fingerprint(spec(compileMode="reduce-overhead")) != "a6efe1362f54bcf9"


def test_a_checkpoint_is_on_disk_before_the_rename_that_makes_it_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a node crash, a checkpoint-* folder must be whole: every file and the folder's
    entries are fsynced before the rename, and the rename (the parent folder) after it."""
    import os

    happened: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        happened.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path | str) -> Path:
        happened.append(("rename", f"{self} -> {target}"))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    for step in (100, 100):  # the second replaces a checkpoint of the same step
        happened.clear()
        _save(tmp_path, step)
        tmp = str(tmp_path / ".tmp-checkpoint-000100")
        final = tmp_path / "checkpoint-000100"
        made_final = happened.index(("rename", f"{tmp} -> {final}"))
        synced_before = {path for kind, path in happened[:made_final] if kind == "fsync"}
        for name in ("model.safetensors", checkpoints.STATE_FILE):
            assert f"{tmp}/{name}" in synced_before, happened
        assert tmp in synced_before, happened
        assert ("fsync", str(tmp_path)) in happened[made_final + 1 :], happened
