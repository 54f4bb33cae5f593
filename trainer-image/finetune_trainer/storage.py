"""Where bytes come from and how they land: URIs to local paths, object-store downloads, and
writes that are atomic.

Inputs may be local (a plain path or ``file://``) or remote (``s3://``, ``gs://``,
``https://``, fetched with fsspec into a cache keyed by their content).  ``hf://`` is the
model loader's business (it needs the hub's own client).  ``pvc://`` never reaches a trainer
in a pod, because the operator resolves it to the mount path, so seeing one means a
workstation run.  Outputs in object storage are ``outputs.py``'s business.

Everything the trainer writes under the output goes to a hidden temporary name first and is
renamed into place when complete: a crash leaves a temporary that is cleaned up, never a
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from finetune_trainer import credentials
from finetune_trainer.errors import BadInput

if TYPE_CHECKING:
    from finetune_api.v1alpha1 import FineTuneJobSpec

log = logging.getLogger("finetune_trainer")

REMOTE_SCHEMES = ("s3", "gs", "http", "https")
OBJECT_STORE_SCHEMES = ("s3", "gs")
TEMP_PREFIX = ".tmp-"
DOWNLOADS_DIR = "downloads"
# What identifies an object's content without reading it, most specific first: S3's ETag
# (the MD5 of a single-part upload), GCS's MD5/CRC32C, an HTTP ETag; a modification time
# only where a store offers nothing better.
_CONTENT_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "md5", "checksum", "LastModified", "updated", "mtime")


def slug(text: str, length: int = 40) -> str:
    """A short, file-system-safe name for a folder made from ``text`` (a prompt, say)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "x"


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def local_path(uri: str, *, field: str) -> Path | None:
    """The local path a URI names, or None where it is remote (``s3://``, ``hf://``, ...)."""
    kind = scheme(uri)
    if kind == "pvc":
        raise BadInput(
            f"{uri} is a pvc:// URI, which the operator resolves to the volume's mount path in the pod; "
            "on a workstation use a local path or file:// URI instead",
            field=field,
        )
    if kind == "file":
        parsed = urlparse(uri)
        return Path(unquote(parsed.netloc + parsed.path)).expanduser()
    if kind == "":
        return Path(uri).expanduser()
    return None


@dataclass(frozen=True)
class ObjectStore:
    """The fsspec file systems behind the job's remote URIs, with the job's storage settings.

    Credentials come from the Secret named by ``spec.baseModel.credentialsSecret``, mounted as
    files in a pod (``credentials``); on a workstation the libraries' own environment
    (``AWS_*`` for s3fs, ``GOOGLE_APPLICATION_CREDENTIALS`` for gcsfs)."""

    s3_endpoint_url: str | None = None

    @classmethod
    def for_spec(cls, spec: FineTuneJobSpec) -> ObjectStore:
        return cls(s3_endpoint_url=spec.storage.s3_endpoint_url)

    def filesystem(self, uri: str) -> tuple[Any, str]:
        """(file system, path inside it) for a remote URI."""
        import fsspec

        options: dict[str, Any] = credentials.filesystem_options(scheme(uri))
        if scheme(uri) == "s3" and self.s3_endpoint_url:
            # The spec's endpoint wins over one from the Secret.
            options.get("client_kwargs", {}).pop("endpoint_url", None)
            options["endpoint_url"] = self.s3_endpoint_url
        return fsspec.core.url_to_fs(uri, **options)


def remote_listing(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """``{relative path: info}`` of the files at ``path`` (one file: the key is ``""``);
    temporaries of an interrupted upload are not part of it.  FileNotFoundError if nothing is there."""
    path = path.rstrip("/")
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        listing = {
            name[len(path) :].lstrip("/"): info
            for name, info in found.items()
            if info.get("type", "file") != "directory"
            and not any(part.startswith(TEMP_PREFIX) for part in name[len(path) :].split("/"))
        }
        if listing:
            return listing
    if fs.isfile(path):
        return {"": fs.info(path)}
    raise FileNotFoundError(path)


def content_key(uri: str, listing: dict[str, dict[str, Any]]) -> str:
    """A cache key that changes when the content at ``uri`` does: each file's name, size and
    content tag.  Where a store gives no tag, the URI is part of the key (then a changed file
    of the same size would be missed, and the README says so)."""
    entries = []
    tagged = True
    for name in sorted(listing):
        info = listing[name]
        tag = next((str(info[t]) for t in _CONTENT_TAGS if info.get(t)), None)
        tagged = tagged and tag is not None
        entries.append([name, info.get("size"), tag])
    if not tagged:
        entries.append(["uri", uri, None])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def fetch(
    uri: str,
    *,
    field: str,
    cache_dir: Path,
    store: ObjectStore | None = None,
    missing_ok: bool = False,
) -> Path | None:
    """A local copy of a remote file or folder (fsspec), cached by content: a download is
    reused while the objects at the URI are unchanged, and done anew when they change.

    None where the URI holds nothing and ``missing_ok``; bad input otherwise."""
    path = local_path(uri, field=field)
    if path is not None:
        return path
    if scheme(uri) not in REMOTE_SCHEMES:
        raise BadInput(f"cannot read {uri}: use a local path, file://, s3://, gs:// or https://", field=field)
    store = store or ObjectStore()
    try:
        fs, remote = store.filesystem(uri)
        try:
            listing = remote_listing(fs, remote)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise BadInput(f"{uri} does not exist", field=field) from None
        outside = [rel for rel in listing if rel.startswith("/") or ".." in rel.split("/")]
        if outside:
            # An object store's keys may hold '..': written as they are, they land outside the
            # download folder (over the model, or anywhere the trainer may write).
            raise BadInput(
                f"{uri}: the object {outside[0]!r} would be written outside the download folder "
                "(a key with a '..' part): rename it in the store",
                field=field,
            )
        name = Path(urlparse(uri).path.rstrip("/")).name
        if name in ("", ".", ".."):
            name = "download"
        dest = cache_dir / DOWNLOADS_DIR / content_key(uri, listing) / name
        if dest.exists():
            log.info(f"{uri}: using the cached copy {dest}", extra={"event": "download-cached"})
            return dest
        log.info(f"downloading {uri} ({len(listing)} file(s))", extra={"event": "download"})
        with atomic_path(dest) as tmp:
            for rel, info in listing.items():
                target = tmp / rel if rel else tmp
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{remote.rstrip('/')}/{rel}" if rel else remote, str(target))
                size = info.get("size")
                if size is not None and target.stat().st_size != size:
                    raise OSError(f"{uri}/{rel}: got {target.stat().st_size} bytes of {size}")
    except PermissionError as exc:
        raise BadInput(
            f"access to {uri} was refused ({exc}); put credentials in the Secret named by "
            "spec.baseModel.credentialsSecret (or the environment, on a workstation)",
            field=field,
        ) from None
    return dest


def _temporary_sibling(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; when the block succeeds, it becomes ``final``.

    Works for a file or a folder.  An existing ``final`` is replaced only once the new one is
    complete (it is moved aside first, so that a folder can be replaced too).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if final.is_dir() and not final.is_symlink():
            old = _temporary_sibling(final)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete what an earlier, interrupted process left under a temporary name in ``folder``."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(TEMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(root: Path) -> None:
    """Some writers (safetensors among them) create files as 0600; outputs on a shared volume
    are for other people and pods to read."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
