"""Claims and paths: which PersistentVolumeClaims a FineTuneJob's pvc:// URIs name, where the
pod sees each, and the way back from a path in the pod to the URI a person can use.  Rendering
mounts them (``render/storage.py``); status shows the trainer's paths as URIs (``status.py``)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

from finetune_api.contract import DATA_ROOT
from finetune_api.job_policy import claim_of, claim_uses
from finetune_api.v1alpha1 import FineTuneJob
from finetune_operator import names


@dataclass(frozen=True)
class ClaimMount:
    """One PersistentVolumeClaim the pod mounts, and whether it needs to write to it."""

    claim: str
    path: str
    read_only: bool

    @property
    def volume(self) -> str:
        return names.volume_name(self.claim)


def split_pvc(uri: str) -> tuple[str, str]:
    """``pvc://claim/some/path/`` -> (``claim``, ``some/path/``)."""
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def claim_mounts(job: FineTuneJob) -> tuple[ClaimMount, ...]:
    """Every claim named by a pvc:// URI; read-write where the trainer writes (output, class images)."""
    writable: dict[str, bool] = {}
    for _, uri, writes in claim_uses(job.spec):
        if (claim := claim_of(uri)) is not None:
            writable[claim] = writable.get(claim, False) or writes
    return tuple(
        ClaimMount(claim=claim, path=f"{DATA_ROOT}/{claim}", read_only=not writes)
        for claim, writes in sorted(writable.items())
    )


def resolve_uri(uri: str | None) -> str | None:
    """pvc://claim/path -> the path where the pod sees it, never outside the claim's mount."""
    if uri is None or not uri.startswith("pvc://"):
        return uri
    claim, path = split_pvc(uri)
    mount = f"{DATA_ROOT}/{claim}"
    resolved = posixpath.normpath(f"{mount}/{path}")
    if resolved != mount and not resolved.startswith(mount + "/"):
        raise ValueError(f"{uri} leaves the claim {claim}: a pvc:// path may not contain '..'")
    return f"{mount}/{path}" if path else mount


def display_uri(path: str | None, mounts: tuple[ClaimMount, ...] | list[ClaimMount]) -> str | None:
    """The inverse of ``resolve_uri``: a path in the pod -> the pvc:// URI a person can use."""
    if path is None:
        return None
    for mount in mounts:
        if path == mount.path or path.startswith(mount.path + "/"):
            rest = path[len(mount.path) :].lstrip("/")
            return f"pvc://{mount.claim}/{rest}"
    return path
