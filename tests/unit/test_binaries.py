"""Building what was asked, and saying so while it builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_devcluster import binaries

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(*args: str) -> str:
    done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return next(line for line in done.stdout.splitlines() if "finetune_devcluster.binaries" in line)


def test_make_demo_builds_kueue_only_when_asked() -> None:
    assert "kueue" not in _dry_run("demo")
    assert "kueue" not in _dry_run("cluster-up")
    assert _dry_run("demo", "KUEUE=1").split()[-1] == "kueue"
    assert {"helm", "kueue"} <= set(_dry_run("test").split())


def test_a_silent_build_says_how_long_it_has_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    go = tmp_path / "go"
    go.write_text("#!/bin/sh\nsleep 1\necho built\n")
    go.chmod(0o755)
    monkeypatch.setattr(binaries, "_go", lambda: str(go))
    monkeypatch.setattr(binaries, "PROGRESS_EVERY_S", 0.25)
    binaries._run_go(["build"], cwd=tmp_path, env={}, what="build kube-apiserver v1.36.3")
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if line.startswith("[binaries] build kube-apiserver v1.36.3: 0m0")]
    assert len(progress) >= 2, lines
    assert lines[-1].startswith("[binaries] build kube-apiserver v1.36.3: done in")


def test_the_build_is_announced_with_what_and_about_how_long(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(binaries, "find", lambda name: None)
    monkeypatch.setattr(binaries, "_build_kubernetes", lambda names: {n: Path(n) for n in names})
    monkeypatch.setattr(binaries, "_build_single", lambda binary: Path(binary.name))
    binaries.ensure(["etcd", "kube-apiserver", "kube-scheduler"])
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("[binaries] building etcd, kube-apiserver, kube-scheduler from their Go modules")
    assert first.endswith("about 10 minutes on two cores")
    assert binaries.build_estimate(["kueue"]) == binaries.BUILD_MINUTES["kueue"]


def test_missing_prerequisites_are_named_up_front_with_how_to_get_them(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "FINETUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_prerequisites.py"), "cluster"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    for tool, remedy in (
        ("openssl", "Debian's openssl"),
        ("kubectl", "kubernetes-client"),
        ("unshare", "util-linux"),
        ("Go", "FINETUNE_BIN_DIR"),
    ):
        (line,) = [line for line in lines if line.startswith(f"[prerequisites] {tool} ")]
        assert remedy in line
    ready = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_prerequisites.py"), "setup"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ready.returncode == 0, ready.stderr
