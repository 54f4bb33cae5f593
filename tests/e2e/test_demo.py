"""`make demo` as a newcomer runs it, twice in a row: what one run leaves behind (Kueue's
webhooks in etcd, objects applied client-side) does not break the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _demo(state: Path, *args: str) -> str:
    """``make demo`` (its Python entry point) on a cluster of its own under ``state``."""
    env = {k: v for k, v in os.environ.items() if k not in ("KEEP", "KUEUE", "KUBECONFIG")}
    done = subprocess.run(
        [sys.executable, "-m", "finetune_devcluster.demo", "--state-dir", str(state), "--timeout", "600", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def _cluster(state: Path, command: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "finetune_devcluster", command, "--state-dir", str(state)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


def test_make_demo_after_make_demo_kueue_succeeds(tmp_path: Path) -> None:
    """Kueue's webhooks stayed registered in etcd after `make demo KUEUE=1`, its manager gone,
    and the next `make demo` waited forever on a Job no create could make."""
    state = tmp_path / "cluster"
    with_kueue = _demo(state, "--kueue")
    assert "demo-2: Succeeded" in with_kueue
    plain = _demo(state)
    assert "==> done." in plain
    assert "Succeeded" in plain


def test_make_demo_on_a_cluster_whose_crds_were_applied_client_side_succeeds(tmp_path: Path) -> None:
    """`kubectl apply -f crds/` (most people's habit) on `make cluster-up`'s cluster, then
    `make demo`: the demo's server-side apply stopped at once on a field-manager conflict."""
    state = tmp_path / "cluster"
    _cluster(state, "up")
    try:
        kubeconfig = state / "kubeconfig"
        subprocess.run(
            ["kubectl", f"--kubeconfig={kubeconfig}", "apply", "-f", str(ROOT / "crds")],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        output = _demo(state)
        assert "using the control plane already running" in output
        assert "==> done." in output
    finally:
        _cluster(state, "down")
