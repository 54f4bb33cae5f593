"""Where bytes come from and how they land: URIs to local paths, and writes that are atomic.

Inputs may be local (a plain path or ``file://``) or remote (``s3://``, ``gs://``,
``https://``, fetched with fsspec into a cache).  ``hf://`` is the model loader's business
(it needs the hub's own client).  ``pvc://`` never reaches a trainer in a pod, because the
operator resolves it to the mount path, so seeing one means a workstation run.

Everything the trainer writes under the output goes to a hidden temporary name first and is
renamed into place when complete: a crash leaves a temporary that is cleaned up, never a
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from finetune_trainer.errors import BadInput

REMOTE_SCHEMES = ("s3", "gs", "http", "https")
TEMP_PREFIX = ".tmp-"


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


def fetch(uri: str, *, field: str, cache_dir: Path) -> Path:
    """A local copy of a remote file or folder (fsspec), reused when already complete."""
    path = local_path(uri, field=field)
    if path is not None:
        return path
    if scheme(uri) not in REMOTE_SCHEMES:
        raise BadInput(f"cannot read {uri}: use a local path, file://, s3://, gs:// or https://", field=field)
    import fsspec

    dest = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(urlparse(uri).path.rstrip("/")).name
    if dest.exists():
        return dest
    try:
        fs, remote = fsspec.core.url_to_fs(uri)
        is_dir = fs.isdir(remote)
        if not is_dir and not fs.exists(remote):
            raise BadInput(f"{uri} does not exist", field=field)
        with atomic_path(dest) as tmp:
            if is_dir:
                fs.get(remote.rstrip("/") + "/", str(tmp), recursive=True)
            else:
                fs.get(remote, str(tmp))
    except PermissionError as exc:
        raise BadInput(
            f"access to {uri} was refused ({exc}); put credentials in the Secret named by "
            "spec.baseModel.credentialsSecret (or the environment, on a workstation)",
            field=field,
        ) from None
    return dest


def output_dir(uri: str, *, field: str = "spec.output.uri") -> Path:
    path = local_path(uri, field=field)
    if path is None:
        raise BadInput(
            f"{uri}: the trainer writes to a local folder (a volume in the pod); object-store outputs "
            "are not supported yet: use pvc://CLAIM/path or a local path",
            field=field,
        )
    return path


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
        _fsync_dir(final.parent)
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


def _fsync_dir(folder: Path) -> None:
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
