"""A container's volume mount, as the node agent hands it to ``podexec``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MountPoint:
    source: Path
    target: str
    read_only: bool
