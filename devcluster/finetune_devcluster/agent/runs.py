"""What the agent keeps of a pod it runs and of each of its containers."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ContainerRun:
    name: str
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    log: Path | None = None
    termination_file: Path | None = None
    message: str = ""
    # Why it could not be started (its mounts), as a kubelet's CreateContainerError says.
    start_error: str = ""


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    directory: Path
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    thread: threading.Thread | None = None
    terminating: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 30.0


def log_file(pod_folder: Path, container: str) -> Path:
    """Where a container's output goes (stdout and stderr, as a kubelet keeps them)."""
    return pod_folder / f"{container}.log"
