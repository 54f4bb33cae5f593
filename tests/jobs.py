"""Jobs that really train: the tiny assets copied into a namespace's claims, a manifest like
`examples/demo.yaml` with overrides, and a way to find (and kill) a job's trainer process."""

from __future__ import annotations

import copy
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import yaml

from tests.kube import Kube

ROOT = Path(__file__).resolve().parent.parent

CLAIMS = ("models", "datasets", "outputs")


def prepare_claims(kube: Kube, namespace: str, assets: Path) -> dict[str, Path]:
    paths = {claim: kube.create_pvc(namespace, claim) for claim in CLAIMS}
    shutil.copytree(assets / "tiny-sd", paths["models"] / "tiny-sd")
    shutil.copytree(assets / "subject", paths["datasets"] / "subject")
    return paths


def job_manifest(name: str, **overrides: Any) -> dict[str, Any]:
    """examples/demo.yaml renamed, with spec sections updated from ``overrides``."""
    manifest = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"]["output"]["uri"] = f"pvc://outputs/{name}/"
    for section, values in overrides.items():
        if isinstance(values, dict):
            manifest["spec"].setdefault(section, {}).update(copy.deepcopy(values))
        else:
            manifest["spec"][section] = values
    return manifest


def trainer_processes(namespace: str, name: str) -> list[int]:
    """Process ids of the trainer running for FineTuneJob namespace/name (found by its env)."""
    wanted = f"FINETUNE_JOB={namespace}/{name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in environ and b"finetune_trainer" in cmdline:
            found.append(int(entry.name))
    return found


def kill_trainer(namespace: str, name: str) -> int:
    """SIGKILL the trainer's process group, as a node failure or OOM kill would."""
    pids = trainer_processes(namespace, name)
    assert pids, f"no trainer process for {namespace}/{name}"
    groups = {os.getpgid(pid) for pid in pids}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    return len(pids)
