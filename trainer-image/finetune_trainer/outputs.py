"""Where a run's files go: a local folder (a volume in the pod), or an object store.

For an ``s3://`` or ``gs://`` output the trainer writes to a local staging folder under the
cache and uploads each file once it is complete: checkpoints after each save, class images
after they are generated, samples and pictures at each sample step, the exports at the end
and ``manifest.json`` last.  A new pod (a retry) pulls the newest complete checkpoint, the
class images and the samples back and goes on from there.

Every upload follows the same steps, so that nothing partial or unchecked ever sits under a
final name: the file goes to a hidden temporary key beside its final one (``.tmp-NAME.ID``;
S3 multipart uploads become an object only when completed), is read back and its SHA-256
compared with the local file's (the manifest's), and only then is renamed (a server-side
copy) to its final key.  Failures are retried with backoff.  A checkpoint is complete when
its ``trainer_state.json`` is there, which is uploaded after every other file of it.  At
start, temporaries of an interrupted upload are removed (for S3 also unfinished multipart
uploads under the output), as a local run removes its ``.tmp-*`` leftovers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune_trainer import storage
from finetune_trainer.checkpoints import STATE_FILE, checkpoint_name, complete_checkpoints
from finetune_trainer.errors import BadInput, TrainerError

log = logging.getLogger("finetune_trainer")

FIELD = "spec.output.uri"
OUTPUTS_DIR = "outputs"
CHECKPOINTS_DIR = "checkpoints"
# Folders a retry pulls back besides the newest checkpoint: class images are not generated
# twice, and the contact sheet keeps the rows of earlier attempts.
PULLED_FOLDERS = ("class_images", "samples")
# Part size of multipart uploads (s3fs and gcsfs take it as ``chunksize``).
UPLOAD_CHUNK_BYTES = 64 * 2**20
UPLOAD_ATTEMPTS = 5


class UploadFailed(TrainerError):  # noqa: N818
    """An upload that did not succeed after its retries: transient, a retry of the pod resumes."""


class Output:
    """The output folder of a run.  ``local`` is where the trainer writes; for an object-store
    output it is a staging folder and ``remote`` mirrors it."""

    def __init__(self, uri: str, *, cache_dir: Path, store: storage.ObjectStore) -> None:
        self.uri = uri
        path = storage.local_path(uri, field=FIELD)
        self.remote: RemoteFolder | None = None
        if path is not None:
            self.local = path
        elif storage.scheme(uri) in storage.OBJECT_STORE_SCHEMES:
            self.local = cache_dir / OUTPUTS_DIR / hashlib.sha256(uri.encode()).hexdigest()[:16]
            self.remote = RemoteFolder(uri, store)
        else:
            raise BadInput(
                f"{uri}: an output is a local folder, pvc://CLAIM/path, s3://BUCKET/path or gs://BUCKET/path",
                field=FIELD,
            )

    def location(self) -> str:
        """The output as reports name it: the local folder, or the object-store URI."""
        return self.remote.uri if self.remote is not None else str(self.local)

    def uri_of(self, path: Path) -> str:
        """What a report says for a file or folder under ``local``."""
        if self.remote is None:
            return str(path)
        return self.remote.uri_of(path.relative_to(self.local).as_posix())

    # --- small markers at the top of the folder (the owner record, the lock) ---------------------

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """A JSON marker, or None where there is none (or it is unreadable: being rewritten)."""
        try:
            if self.remote is not None:
                self.remote.fs.invalidate_cache()
                with self.remote.fs.open(self.remote.key(name), "rb") as handle:
                    raw = handle.read()
            else:
                raw = (self.local / name).read_bytes()
            data = json.loads(raw)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def create_marker(self, name: str, text: str) -> bool:
        """Write a marker only where none is: True if this call created it."""
        if self.remote is not None:
            try:
                self.remote.fs.pipe_file(self.remote.key(name), text.encode(), mode="create")
            except (FileExistsError, OSError) as exc:
                if isinstance(exc, FileExistsError) or self.remote.fs.exists(self.remote.key(name)):
                    return False
                raise
            return True
        self.local.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.local / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def write_marker(self, name: str, text: str) -> None:
        if self.remote is not None:
            self.remote.fs.pipe_file(self.remote.key(name), text.encode())
            return
        storage.write_text_atomic(self.local / name, text)
        storage.make_readable(self.local / name)

    def delete_marker(self, name: str) -> None:
        if self.remote is not None:
            self.remote.delete(name)
        else:
            (self.local / name).unlink(missing_ok=True)

    def marker_age(self, name: str) -> float | None:
        """Seconds since the marker was last written, by the store's clock where it has one."""
        try:
            if self.remote is not None:
                self.remote.fs.invalidate_cache()
                info = self.remote.fs.info(self.remote.key(name))
                stamp = info.get("LastModified") or info.get("updated") or info.get("mtime")
                if isinstance(stamp, str):
                    stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                modified = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
            else:
                modified = (self.local / name).stat().st_mtime
        except (OSError, TypeError, ValueError):
            return None
        return max(0.0, time.time() - modified)

    def entries(self) -> list[str]:
        """The names at the top of the folder (the local one, or the store's)."""
        if self.remote is not None:
            remote = self.remote
            remote.fs.invalidate_cache()
            if not remote.fs.isdir(remote.root):
                return []
            return sorted(key.rstrip("/").rsplit("/", 1)[-1] for key in remote.fs.ls(remote.root, detail=False))
        return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []

    def holds_any(self, names: Iterable[str]) -> bool:
        return bool(set(self.entries()) & set(names))

    def move_aside(self, folder: str, *, keep: Iterable[str] = ()) -> list[str]:
        """Move everything at the top of the folder into ``folder`` (inside it): nothing is
        deleted.  Earlier ``.replaced-*`` folders, temporaries and ``keep`` stay where they are."""
        skip = {*keep, folder}
        names = [
            n
            for n in self.entries()
            if n not in skip and not n.startswith(".replaced-") and not n.startswith(storage.TEMP_PREFIX)
        ]
        if self.remote is not None:
            remote = self.remote
            for name in names:
                remote.fs.mv(remote.key(name), remote.key(f"{folder}/{name}"), recursive=True)
            remote.fs.invalidate_cache()
            # The staging folder mirrors the store: what moved there is gone here too.
            if self.local.is_dir():
                shutil.rmtree(self.local)
        else:
            (self.local / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (self.local / name).rename(self.local / folder / name)
            storage.fsync_dir(self.local / folder)
            storage.fsync_dir(self.local)
        return names

    # --- object stores only; each is a no-op for a local output ----------------------------------

    def pull(self) -> None:
        """Make the staging folder what the store holds: leftovers removed, the newest complete
        checkpoint, the class images and the samples downloaded."""
        if self.remote is None:
            return
        remote = self.remote
        remote.remove_temporaries()
        remote.remove_incomplete_checkpoints()
        self.local.mkdir(parents=True, exist_ok=True)
        checkpoints_dir = self.local / CHECKPOINTS_DIR
        steps = remote.complete_checkpoint_steps()
        # The store is the truth: a local checkpoint it does not hold complete (an earlier
        # attempt on this machine died before uploading it) is not resumed from.
        for local in complete_checkpoints(checkpoints_dir):
            if local.step not in steps:
                shutil.rmtree(local.path, ignore_errors=True)
        if steps:
            newest = max(steps)
            dest = checkpoints_dir / checkpoint_name(newest)
            if not (dest / STATE_FILE).is_file():
                remote.download_folder(f"{CHECKPOINTS_DIR}/{checkpoint_name(newest)}", dest)
        for folder in PULLED_FOLDERS:
            remote.download_missing(folder, self.local / folder)

    def push(self, paths: Iterable[Path], *, sha256: dict[str, str] | None = None) -> None:
        """Upload files under ``local`` (``sha256``: known digests by relative path, e.g. the manifest's)."""
        if self.remote is None:
            return
        known = sha256 or {}
        for path in paths:
            rel = path.relative_to(self.local).as_posix()
            self.remote.upload(path, rel, sha256=known.get(rel) or storage.sha256_file(path))

    def push_checkpoint(self, path: Path, *, keep_last: int, keep: frozenset[int] = frozenset()) -> None:
        """Upload a complete local checkpoint, its state file last, and prune older ones."""
        if self.remote is None:
            return
        rel = path.relative_to(self.local).as_posix()
        # A checkpoint of this step already in the store stops looking complete first, so
        # that its files are never a mix of two saves under a state file.
        self.remote.delete(f"{rel}/{STATE_FILE}")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != STATE_FILE)
        self.push([*files, path / STATE_FILE])
        self.remote.prune_checkpoints(keep_last=keep_last, keep=keep)


class RemoteFolder:
    """One folder in an object store, written one verified file at a time."""

    def __init__(
        self,
        uri: str,
        store: storage.ObjectStore,
        *,
        attempts: int = UPLOAD_ATTEMPTS,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.fs, root = store.filesystem(self.uri)
        self.root = root.rstrip("/")
        self.scheme = storage.scheme(uri)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    # --- uploads ---------------------------------------------------------------------------------

    def upload(self, local: Path, rel: str, *, sha256: str) -> None:
        """``local`` to ``rel``: temporary key, read back and compared, renamed; retried."""
        final = self.key(rel)
        size = local.stat().st_size
        if self._holds(final, size=size, sha256=sha256):
            log.info(f"{self.uri_of(rel)} is already uploaded and whole", extra={"event": "upload-skipped"})
            return
        delay = self.backoff_s
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            tmp = self._temporary_key(final)
            try:
                self._put(local, tmp)
                got = self._sha256(tmp)
                if got != sha256:
                    raise OSError(f"read back with SHA-256 {got}, expected {sha256}")
                self.fs.mv(tmp, final)
                self.fs.invalidate_cache()
                stored = self.fs.info(final).get("size")
                if stored != size:
                    raise OSError(f"{stored} bytes under the final name, expected {size}")
                log.info(
                    f"uploaded {self.uri_of(rel)}",
                    extra={"event": "uploaded", "fields": {"uri": self.uri_of(rel), "bytes": size, "sha256": sha256}},
                )
                return
            except (PermissionError, FileNotFoundError) as exc:
                self._discard(tmp)
                raise BadInput(
                    f"cannot write {self.uri_of(rel)} ({type(exc).__name__}: {exc}); check that the bucket exists "
                    "and that the credentials in the Secret named by spec.baseModel.credentialsSecret may write it",
                    field=FIELD,
                ) from None
            except Exception as exc:
                last = exc
                self._discard(tmp)
                log.warning(
                    f"upload of {self.uri_of(rel)} failed (attempt {attempt} of {self.attempts}): "
                    f"{type(exc).__name__}: {exc}",
                    extra={"event": "upload-retry"},
                )
                if attempt < self.attempts:
                    self._sleep(delay)
                    delay = min(delay * 2, self.max_backoff_s)
        raise UploadFailed(
            f"could not upload {local} to {self.uri_of(rel)} after {self.attempts} attempts: "
            f"{type(last).__name__}: {last}; a retry resumes from the newest checkpoint"
        )

    def _put(self, local: Path, key: str) -> None:
        options: dict[str, Any] = {}
        if self.scheme in storage.OBJECT_STORE_SCHEMES:
            options["chunksize"] = UPLOAD_CHUNK_BYTES
        self.fs.put_file(str(local), key, **options)

    def _sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(key, "rb", block_size=8 * 2**20) as handle:
            for chunk in iter(lambda: handle.read(8 * 2**20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def _holds(self, key: str, *, size: int, sha256: str) -> bool:
        """True where ``key`` already holds exactly this content (a rerun after an interrupted upload)."""
        try:
            self.fs.invalidate_cache()
            if not self.fs.isfile(key) or self.fs.info(key).get("size") != size:
                return False
            return self._sha256(key) == sha256
        except (OSError, ValueError):
            return False

    @staticmethod
    def _temporary_key(final: str) -> str:
        folder, _, name = final.rpartition("/")
        return f"{folder}/{storage.TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"

    def _discard(self, key: str) -> None:
        try:
            if self.fs.exists(key):
                self.fs.rm(key)
        except Exception as exc:  # the start of the next attempt removes it too
            log.info(f"could not remove {key}: {exc}", extra={"event": "upload-cleanup"})

    def delete(self, rel: str) -> None:
        key = self.key(rel)
        self.fs.invalidate_cache()
        if self.fs.exists(key):
            self.fs.rm(key, recursive=self.fs.isdir(key))

    # --- what is there -----------------------------------------------------------------------------

    def remove_temporaries(self) -> list[str]:
        """Delete what an interrupted upload left: ``.tmp-*`` keys, and S3 multipart uploads
        that were never completed (invisible, but billed)."""
        self.fs.invalidate_cache()
        removed: list[str] = []
        if self.fs.isdir(self.root):
            for key in self.fs.find(self.root):
                if any(part.startswith(storage.TEMP_PREFIX) for part in key[len(self.root) :].split("/")):
                    self.fs.rm(key)
                    removed.append(key)
        if self.scheme == "s3":
            removed += self._abort_multipart_uploads()
        for key in removed:
            log.info(f"removed {key}, left by an interrupted upload", extra={"event": "cleanup"})
        return removed

    def _abort_multipart_uploads(self) -> list[str]:
        bucket, _, prefix = self.root.partition("/")
        aborted: list[str] = []
        try:
            uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        except Exception as exc:  # listing needs a permission some roles lack; not worth failing for
            log.info(f"could not list unfinished uploads in {bucket}: {exc}", extra={"event": "cleanup"})
            return aborted
        for upload in uploads.get("Uploads", []):
            key = upload["Key"]
            if key.rpartition("/")[2].startswith(storage.TEMP_PREFIX):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                aborted.append(f"{bucket}/{key} (unfinished multipart upload)")
        return aborted

    def complete_checkpoint_steps(self) -> dict[int, str]:
        """``{step: relative folder}`` of the checkpoints whose state file is in the store."""
        self.fs.invalidate_cache()
        steps: dict[int, str] = {}
        for key in self.fs.glob(f"{self.root}/{CHECKPOINTS_DIR}/checkpoint-*/{STATE_FILE}"):
            folder = key[len(self.root) + 1 :].rsplit("/", 1)[0]
            try:
                with self.fs.open(key, "rb") as handle:
                    state = json.loads(handle.read())
                steps[int(state["step"])] = folder
            except (OSError, ValueError, KeyError) as exc:
                log.warning(f"ignoring {self.uri_of(folder)}: unreadable {STATE_FILE} ({exc})")
        return steps

    def remove_incomplete_checkpoints(self) -> None:
        complete = set(self.complete_checkpoint_steps().values())
        base = f"{self.root}/{CHECKPOINTS_DIR}"
        if not self.fs.isdir(base):
            return
        for key in self.fs.ls(base, detail=False):
            folder = key[len(self.root) + 1 :].rstrip("/")
            if folder not in complete:
                log.info(f"removing {self.uri_of(folder)}: an incomplete checkpoint", extra={"event": "cleanup"})
                self.fs.rm(key, recursive=True)

    def prune_checkpoints(self, *, keep_last: int, keep: frozenset[int] = frozenset()) -> None:
        steps = self.complete_checkpoint_steps()
        for step in sorted(steps)[: max(0, len(steps) - keep_last)]:
            if step in keep:
                continue
            folder = steps[step]
            # The state file first: a prune cut short leaves an incomplete checkpoint, never a
            # complete-looking one with files missing.
            self.delete(f"{folder}/{STATE_FILE}")
            self.delete(folder)

    # --- downloads ---------------------------------------------------------------------------------

    def download_folder(self, rel: str, dest: Path) -> None:
        with storage.atomic_path(dest) as tmp:
            for name, info in storage.remote_listing(self.fs, self.key(rel)).items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{self.key(rel)}/{name}", str(target))
                if info.get("size") is not None and target.stat().st_size != info["size"]:
                    raise OSError(f"{self.uri_of(rel)}/{name}: got {target.stat().st_size} bytes of {info['size']}")
        log.info(f"downloaded {self.uri_of(rel)} to {dest}", extra={"event": "download"})

    def download_missing(self, rel: str, dest: Path) -> list[Path]:
        """The files of ``rel`` that ``dest`` lacks (each written atomically)."""
        try:
            listing = storage.remote_listing(self.fs, self.key(rel))
        except FileNotFoundError:
            return []
        fetched: list[Path] = []
        for name in sorted(listing):
            target = dest / name
            if name and not target.exists():
                with storage.atomic_path(target) as tmp:
                    self.fs.get_file(f"{self.key(rel)}/{name}", str(tmp))
                fetched.append(target)
        return fetched
