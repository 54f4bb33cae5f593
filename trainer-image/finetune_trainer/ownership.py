"""Who an output folder belongs to, and who is writing it now.

An output folder holds one run: one FineTuneJob (its uid; for ``finetune-trainer run`` on a
workstation, the manifest's name) training on one dataset.  Resuming is keyed on both, so a
re-created FineTuneJob or changed photos never pick up an earlier run's final checkpoint and
re-export it as if they had trained:

- ``.finetune-owner.json`` records the owner and a fingerprint of the dataset (each image's
  name, size and content hash, and its prompt) when a run first claims the folder.  A job that
  finds another owner or another dataset there is refused with ``BadInput`` naming
  ``spec.output.uri``, unless ``spec.output.overwrite`` is true: then everything there is moved
  aside into ``.replaced-<time>/`` inside the folder (never deleted) and the run starts afresh.
  A folder with a run in it but no owner record (written before owners were recorded) counts
  as someone else's.
- ``.finetune-lock.json`` names the writer of the moment (owner, attempt, host, process).  It
  is created exclusively (``O_EXCL`` on a volume, a conditional put in an object store),
  refreshed every ``HEARTBEAT_S`` and removed when the run ends.  A second job writing the same
  folder is refused while the lock is fresh; a lock nobody refreshed for ``STALE_AFTER_S``
  belongs to a writer that is gone (its pod was killed, its Job deleted) and is taken over.  A
  new attempt of the same job (a retried pod) takes its own job's lock over at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from finetune_api import contract
from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    from finetune_api.v1alpha1 import FineTuneJob
    from finetune_trainer.outputs import Output

log = logging.getLogger("finetune_trainer")

FIELD = "spec.output.uri"
OWNER_FILE = ".finetune-owner.json"
LOCK_FILE = ".finetune-lock.json"
REPLACED_PREFIX = ".replaced-"
HEARTBEAT_S = 30.0
# Ten heartbeats: a clock that is some minutes off between nodes still does not make a live
# writer's lock look stale.
STALE_AFTER_S = 300.0
# What a run writes under its output; a folder holding any of these holds a run.
RUN_ENTRIES = ("checkpoints", "manifest.json", "diffusers", "lora", "samples", "class_images")


@dataclass(frozen=True)
class Identity:
    """This run: whose it is (``owner``) and which process is writing (``attempt``)."""

    owner: str  # "uid:<FineTuneJob uid>" in a cluster, "name:<manifest name>" on a workstation
    name: str
    attempt: str
    host: str
    pid: int

    @classmethod
    def of(cls, job: FineTuneJob) -> Identity:
        extra = job.metadata.model_extra or {}
        uid = str(extra.get("uid") or "")
        name = job.metadata.name or "model"
        host = socket.gethostname()
        return cls(
            owner=f"uid:{uid}" if uid else f"name:{name}",
            name=name,
            attempt=os.environ.get(contract.ENV_ATTEMPT) or host,
            host=host,
            pid=os.getpid(),
        )

    @property
    def token(self) -> str:
        """A short tag for temporary names, the same in every process of this attempt (they write
        into one checkpoint together) and different for any other writer."""
        return hashlib.sha256(f"{self.owner}/{self.attempt}".encode()).hexdigest()[:8]


def describe_owner(record: dict[str, Any]) -> str:
    name, owner = record.get("name", "?"), str(record.get("owner", "?"))
    if owner.startswith("uid:"):
        return f"FineTuneJob {name} (uid {owner[4:]})"
    return f"the job named {name}"


class Claim:
    """This run's hold on its output folder: the lock while it runs, the owner record for good."""

    def __init__(self, output: Output, identity: Identity, *, overwrite: bool, clock: Any = time.time) -> None:
        self.output = output
        self.identity = identity
        self.overwrite = overwrite
        self.clock = clock
        self.held = False
        self.replaced: str | None = None  # where earlier content was moved, when it was
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- the lock ------------------------------------------------------------------------------

    def _lock_record(self) -> str:
        return json.dumps({**asdict(self.identity), "time": self.clock()}, sort_keys=True)

    def acquire(self) -> None:
        """Take the lock or refuse: another job is writing this folder."""
        where = self.output.location()
        for _ in range(3):
            if self.output.create_marker(LOCK_FILE, self._lock_record()):
                self.held = True
                self._start_heartbeat()
                return
            holder = self.output.read_marker(LOCK_FILE)
            age = self.output.marker_age(LOCK_FILE)
            if holder is None or age is None:
                continue  # it went away between the two reads: try again
            if self._may_take_over(holder, age):
                log.info(
                    f"taking over the lock on {where} from {holder.get('attempt')} (last refreshed {age:.0f} s ago)",
                    extra={"event": "output-lock-taken-over"},
                )
                self.output.delete_marker(LOCK_FILE)
                continue
            stale_in = max(0.0, STALE_AFTER_S - age)
            raise BadInput(
                f"{where} is being written by {describe_owner(holder)} (attempt {holder.get('attempt')}, "
                f"refreshed {age:.0f} s ago); give this job another output folder, or wait for that job to "
                f"end (if it is gone, its lock counts as stale in {stale_in:.0f} s)",
                field=FIELD,
            )
        raise BadInput(f"{where}: could not take the output's lock ({LOCK_FILE}); another writer races for it")

    def _may_take_over(self, holder: dict[str, Any], age: float) -> bool:
        if age >= STALE_AFTER_S:
            return True
        if holder.get("owner") != self.identity.owner:
            return False
        # The same job: a new attempt replaces the old one, which is gone (a Job starts its next
        # pod once the last one has ended).  On one machine, a process that is still alive keeps it.
        if holder.get("host") == self.identity.host and holder.get("attempt") == self.identity.attempt:
            return not _alive(int(holder.get("pid") or 0)) or int(holder.get("pid") or 0) == self.identity.pid
        return True

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.output.write_marker(LOCK_FILE, self._lock_record())
                except Exception as exc:  # a missed beat is retried; the lock is stale only after ten
                    log.warning(f"could not refresh the output's lock: {exc}", extra={"event": "output-lock"})

        self._heartbeat = threading.Thread(target=beat, name="output-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.held:
            self.held = False
            with contextlib.suppress(Exception):
                holder = self.output.read_marker(LOCK_FILE)
                if (
                    holder is not None
                    and holder.get("pid") == self.identity.pid
                    and holder.get("attempt") == self.identity.attempt
                ):
                    self.output.delete_marker(LOCK_FILE)

    # --- the owner -----------------------------------------------------------------------------

    def check_owner(self) -> None:
        """Before anything is written: the folder is empty, ours, or (overwrite) moved aside."""
        record = self.output.read_marker(OWNER_FILE)
        if record is not None and record.get("owner") == self.identity.owner:
            return
        if record is None and not self.output.holds_any(RUN_ENTRIES):
            return
        whose = describe_owner(record) if record is not None else "an earlier run whose owner was not recorded"
        self._refuse_or_replace(f"{self.output.location()} holds the run of {whose}")

    def settle(self, *, dataset: str) -> None:
        """Once the images are read: the dataset is the one the folder was trained on, or the
        folder becomes this run's."""
        record = self.output.read_marker(OWNER_FILE)
        if record is not None and record.get("owner") == self.identity.owner and record.get("dataset") != dataset:
            self._refuse_or_replace(
                f"{self.output.location()} holds a run of this job on other images (dataset fingerprint "
                f"{record.get('dataset')}, now {dataset}: photos or captions were added, removed or changed)"
            )
            record = None
        if record is None:
            owner = {
                "owner": self.identity.owner,
                "name": self.identity.name,
                "dataset": dataset,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.output.write_marker(OWNER_FILE, json.dumps(owner, indent=2, sort_keys=True))

    def _refuse_or_replace(self, what: str) -> None:
        if not self.overwrite:
            raise BadInput(
                f"{what}; resuming it would return that model, not train this one. Give this job a new "
                f"output folder, or set spec.output.overwrite: true to move what is there aside (into "
                f"{REPLACED_PREFIX}<time>/ in the folder) and start afresh",
                field=FIELD,
            )
        aside = f"{REPLACED_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self.identity.token}"
        moved = self.output.move_aside(aside, keep=(LOCK_FILE,))
        self.replaced = aside
        log.info(
            f"{what}; spec.output.overwrite is true: moved {len(moved)} entries into {aside}",
            extra={"event": "output-replaced", "fields": {"moved": moved}},
        )


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
