"""Checkpoints: the full training state under ``<output>/checkpoints/checkpoint-NNNNNN/``.

Each holds accelerate's state (models, optimizer, LR scheduler, RNG, gradient scaler) and
``trainer_state.json`` (step, seed, how far through the data, a fingerprint of the settings
that shape training).  It is written under a hidden temporary name, synced to disk and
renamed when complete, so a directory named ``checkpoint-*`` is always whole, after a node
crash too; the state file is written last, as a second guard.  Older checkpoints are
pruned only after a newer one is complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.v1alpha1 import CheckpointRef, FineTuneJobSpec
from finetune_trainer import storage
from finetune_trainer.errors import BadInput

log = logging.getLogger("finetune_trainer")

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


# Fields added after checkpoints were first written, with their defaults: left out of the
# fingerprint while at the default, so a run checkpointed by an earlier trainer resumes.
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("training", "compile_mode"): "default",
    ("training", "prefer_bf16"): True,
    ("base_model", "vae_uri"): None,
    ("base_model", "components_uri"): None,
    ("training", "base_quantization"): "none",
    ("training", "timestep_sampling"): None,
    ("dataset", "layout"): "auto",
    ("dataset", "concepts"): None,
    ("dataset", "caption_column"): "text",
    ("dataset", "caption_extension"): ".txt",
    ("dataset", "require_captions"): False,
    ("dataset", "trigger_word"): None,
    ("dataset", "caption_dropout"): 0.0,
    ("dataset", "shuffle_caption"): False,
    ("dataset", "keep_tokens"): 0,
    ("dataset", "buckets"): None,
    ("dataset", "bucket_min_side"): None,
    ("dataset", "bucket_max_side"): None,
    ("dataset", "bucket_max_ratio"): 2.0,
    ("dataset", "masks"): None,
    ("dataset", "masked_loss_background"): None,
    ("training", "ema"): None,
}


def training_fingerprint(spec: FineTuneJobSpec) -> str:
    """A hash of everything that decides what training computes.  Checkpoint frequency,
    exports, resources and retries are left out: changing them does not change the result."""
    shaping = spec.model_dump(mode="json", include={"method", "base_model", "dataset", "training"})
    # The values in effect: an unset rate or resolution trains exactly as its default written out.
    shaping["training"]["learning_rate"] = spec.learning_rate
    shaping["dataset"]["resolution"] = spec.resolution
    for (section, name), default in ADDED_FIELDS.items():
        if name in shaping[section] and shaping[section][name] == default:
            del shaping[section][name]
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    state: dict[str, Any]

    def ref(self, *, uri: str | None = None) -> CheckpointRef:
        """For reports; ``uri`` where it is not the local path (an object-store output)."""
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return CheckpointRef(
            step=self.step,
            uri=uri or str(self.path),
            size_bytes=size,
            time=self.state.get("time"),
            scores=dict(self.state.get("scores") or {}),
        )


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """The complete checkpoints under ``root``, oldest first."""
    found: list[Checkpoint] = []
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = _NAME.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        try:
            state = json.loads((entry / STATE_FILE).read_text())
        except (OSError, ValueError):
            log.warning(f"ignoring {entry}: it has no readable {STATE_FILE}", extra={"event": "checkpoint-incomplete"})
            continue
        found.append(Checkpoint(step=int(state.get("step", match[1])), path=entry, state=state))
    return sorted(found, key=lambda c: c.step)


def newest(root: Path) -> Checkpoint | None:
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def check_compatible(checkpoint: Checkpoint, *, fingerprint: str, output_field: str = "spec.output.uri") -> None:
    """Refuse to continue someone else's run: the output folder holds checkpoints of a job
    whose training settings differ."""
    theirs = checkpoint.state.get("fingerprint")
    if theirs != fingerprint:
        raise BadInput(
            f"{checkpoint.path.parent} holds checkpoints of a run with different training settings "
            f"(fingerprint {theirs}, this job {fingerprint}); use a new output folder, or delete "
            f"{checkpoint.path.parent} to start over",
            field=output_field,
        )


def save(
    accelerator: Any,
    root: Path,
    *,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    writer: str = "",
    keep: frozenset[int] = frozenset(),
) -> Checkpoint:
    """Write a checkpoint for ``step`` (every process takes part) and prune the oldest but the
    steps in ``keep`` (spec.evaluation's best).

    ``writer`` tags the temporary name: the same on every process of this run (they all write
    into it), another for any other writer."""
    final = root / checkpoint_name(step)
    tmp = root / f"{storage.TEMP_PREFIX}{final.name}{'.' + writer if writer else ''}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    checkpoint = Checkpoint(step=step, path=final, state=state)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        # The rename is what makes a checkpoint final: the files and the folder's entries must
        # be on disk before it, and the rename itself after it, or a node crash leaves a
        # checkpoint-* that looks whole and is not.
        sync_tree(tmp)
        if final.exists():
            aside = root / f"{storage.TEMP_PREFIX}{final.name}.old"
            final.rename(aside)
            tmp.rename(final)
            _fsync(root, folder=True)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(final)
            _fsync(root, folder=True)
        storage.make_readable(final)
        prune(root, keep_last=keep_last, keep=keep)
    accelerator.wait_for_everyone()
    return checkpoint


def _fsync(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot sync a folder (EINVAL); a file that cannot be synced is an error.
        if not folder or exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder from the deepest up, ``folder`` last."""
    folders = [folder]
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            _fsync(path)
    for directory in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync(directory, folder=True)


def prune(root: Path, *, keep_last: int, keep: frozenset[int] = frozenset()) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints and those of the steps in ``keep``."""
    complete = complete_checkpoints(root)
    removed = [c.path for c in complete[: max(0, len(complete) - keep_last)] if c.step not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load(accelerator: Any, checkpoint: Checkpoint) -> None:
    accelerator.load_state(str(checkpoint.path))
