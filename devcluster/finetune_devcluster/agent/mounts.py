"""The mount points that containers' volumes need on the host, shared between pods."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MountPoint:
    source: Path
    target: str
    read_only: bool


class MountPoints:
    """Mount points made on the host for pods, removed when the last pod using them ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[Path, int] = {}

    def acquire(self, target: str, *, is_dir: bool) -> list[Path]:
        """Create ``target`` (and missing parents) on the host; return the paths to release later."""
        path = Path(target)
        with self._lock:
            if path in self._users:
                # Made for another pod that still runs: share it.
                self._users[path] += 1
                return [path]
            missing = []
            probe = path
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            created = []
            for item in reversed(missing):
                if item == path and not is_dir:
                    item.touch()
                else:
                    item.mkdir()
                self._users[item] = 1
                created.append(item)
            return created

    def release(self, paths: list[Path]) -> None:
        with self._lock:
            for item in sorted(paths, key=lambda p: len(p.parts), reverse=True):
                count = self._users.get(item, 0) - 1
                if count > 0:
                    self._users[item] = count
                    continue
                self._users.pop(item, None)
                with contextlib.suppress(OSError):
                    if item.is_dir():
                        item.rmdir()
                    elif item.is_file() and item.stat().st_size == 0:
                        item.unlink()
