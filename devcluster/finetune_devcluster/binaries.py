"""Find or build the control-plane binaries the local cluster runs.

Order of preference, per binary: a directory named by ``FINETUNE_BIN_DIR`` or
``KUBEBUILDER_ASSETS``; the ``PATH``; the cache (``~/.cache/finetune-operator/bin``,
or ``$FINETUNE_CACHE``); and last, a build from the pinned Go modules through the
module proxy.  A build runs once per version and lands in the cache.

This module uses the standard library only: ``make`` runs it before any virtual
environment exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
STAGING_VERSION = "v0.36.3"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
KWOK_VERSION = "v0.8.0"
KUEUE_VERSION = "v0.17.0"


@dataclass(frozen=True)
class GoBinary:
    """One binary, the Go module that builds it and the pinned version."""

    name: str
    version: str
    module: str
    package: str


BINARIES: dict[str, GoBinary] = {
    "kube-apiserver": GoBinary(
        "kube-apiserver", KUBERNETES_VERSION, "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"
    ),
    "kube-controller-manager": GoBinary(
        "kube-controller-manager",
        KUBERNETES_VERSION,
        "k8s.io/kubernetes",
        "k8s.io/kubernetes/cmd/kube-controller-manager",
    ),
    "kube-scheduler": GoBinary(
        "kube-scheduler", KUBERNETES_VERSION, "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"
    ),
    "kubelet": GoBinary("kubelet", KUBERNETES_VERSION, "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kubelet"),
    "etcd": GoBinary("etcd", ETCD_VERSION, "go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3/etcdmain"),
    "helm": GoBinary("helm", HELM_VERSION, "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm"),
    "kwok": GoBinary("kwok", KWOK_VERSION, "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok"),
    "kueue": GoBinary("kueue", KUEUE_VERSION, "sigs.k8s.io/kueue", "sigs.k8s.io/kueue/cmd/kueue"),
}

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class BinaryError(RuntimeError):
    """A binary could not be found or built; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator"
    )
    return Path(root)


def _cached_path(binary: GoBinary) -> Path:
    return cache_dir() / "bin" / f"{binary.name}-{binary.version}" / binary.name


def _log(message: str) -> None:
    print(f"[binaries] {message}", file=sys.stderr, flush=True)


def find(name: str) -> Path | None:
    """Return a usable binary for ``name`` without building, or None."""
    binary = BINARIES[name]
    for var in ("FINETUNE_BIN_DIR", "KUBEBUILDER_ASSETS"):
        directory = os.environ.get(var)
        if directory and (Path(directory) / name).is_file():
            return Path(directory) / name
    on_path = shutil.which(name)
    # kubectl plugins and distro packages sometimes put an unrelated "etcd" or
    # "helm" on the PATH; only take it when a test run opts in.
    if on_path and os.environ.get("FINETUNE_USE_PATH_BINARIES") == "1":
        return Path(on_path)
    cached = _cached_path(binary)
    if cached.is_file():
        return cached
    return None


# Minutes each build took cold on two busy cores (2026-12-07: kube-apiserver 7m01s, then the
# other two 1m27s; etcd 53s; helm 2m30s; kueue 6m30s; modules downloaded included): said before
# a build starts, so that nobody waits on a silent terminal wondering.
BUILD_MINUTES = {
    "k8s.io/kubernetes": 9.0,  # kube-apiserver, kube-controller-manager and kube-scheduler together
    "etcd": 1.0,
    "helm": 2.5,
    "kwok": 2.0,
    "kueue": 6.5,
}
# A line at least this often while a build runs.
PROGRESS_EVERY_S = 15.0


def build_estimate(missing: Sequence[str]) -> float:
    """Minutes that building ``missing`` takes cold on two cores, about."""
    kubernetes = any(BINARIES[n].module == "k8s.io/kubernetes" for n in missing)
    rest = [n for n in missing if BINARIES[n].module != "k8s.io/kubernetes"]
    return (BUILD_MINUTES["k8s.io/kubernetes"] if kubernetes else 0.0) + sum(BUILD_MINUTES.get(n, 2.0) for n in rest)


def ensure(names: Sequence[str]) -> dict[str, Path]:
    """Find each binary, building the missing ones from their Go modules."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = find(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        _log(
            f"building {', '.join(missing)} from their Go modules, once (cached in {cache_dir() / 'bin'}): "
            f"about {build_estimate(missing):.0f} minutes on two cores"
        )
    kubernetes = [n for n in missing if BINARIES[n].module == "k8s.io/kubernetes"]
    if kubernetes:
        found.update(_build_kubernetes(kubernetes))
    for name in missing:
        if name not in kubernetes:
            found[name] = _build_single(BINARIES[name])
    return {name: found[name] for name in names}


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BinaryError(
            "Go is not installed, and the control-plane binaries are not cached. Install Go "
            "(https://go.dev/dl/), or put kube-apiserver, kube-controller-manager, kube-scheduler "
            "and etcd in a directory and set FINETUNE_BIN_DIR to it."
        )
    return go


def _run_go(args: list[str], *, cwd: Path, env: dict[str, str], what: str) -> None:
    started = time.monotonic()
    _log(f"{what}: go {' '.join(args)}")
    proc = subprocess.Popen(
        [_go(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    stream = proc.stdout

    def read() -> None:
        for line in stream:
            tail.append(line.rstrip())
            del tail[:-40]

    # go build prints nothing for minutes: its output is read aside, and a line goes out every
    # PROGRESS_EVERY_S whatever it prints.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        try:
            proc.wait(timeout=PROGRESS_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            elapsed = int(time.monotonic() - started)
            _log(f"{what}: {elapsed // 60}m{elapsed % 60:02d}s")
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise BinaryError(f"{what} failed after {time.monotonic() - started:.0f}s:\n" + "\n".join(tail))
    _log(f"{what}: done in {time.monotonic() - started:.0f}s")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "0")
    # A module that needs a newer Go fetches an approved toolchain via the proxy.
    env.setdefault("GOTOOLCHAIN", "auto")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def _staging_replaces(go: str, env: dict[str, str], workdir: Path) -> list[str]:
    """The k8s.io staging modules k8s.io/kubernetes replaces with ./staging paths."""
    out = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w./-]+)\s*=>\s*\./staging/", gomod, re.MULTILINE)))


def _build_kubernetes(names: list[str]) -> dict[str, Path]:
    env = _go_env()
    with tempfile.TemporaryDirectory(prefix="finetune-k8s-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text("module finetune.dev/k8sbuild\n\ngo 1.26\n")
        staging = _staging_replaces(_go(), env, work)
        lines = [
            "module finetune.dev/k8sbuild",
            "",
            "go 1.26",
            "",
            f"require k8s.io/kubernetes {KUBERNETES_VERSION}",
            "",
            "replace (",
            *[f"\t{module} => {module} {STAGING_VERSION}" for module in staging],
            ")",
            "",
        ]
        (work / "go.mod").write_text("\n".join(lines))
        imports = "\n".join(f'\t_ "{BINARIES[n].package}"' for n in names)
        (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
        _run_go(["mod", "tidy", "-e"], cwd=work, env=env, what="resolve k8s.io/kubernetes modules")
        major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
        base = "k8s.io/component-base/version"
        ldflags = " ".join(
            [
                "-s -w",
                f"-X {base}.gitVersion={KUBERNETES_VERSION}",
                f"-X {base}.gitMajor={major}",
                f"-X {base}.gitMinor={minor}",
                f"-X {base}.gitTreeState=clean",
                f"-X {base}.buildDate=1970-01-01T00:00:00Z",
                f"-X k8s.io/client-go/pkg/version.gitVersion={KUBERNETES_VERSION}",
                f"-X k8s.io/client-go/pkg/version.gitMajor={major}",
                f"-X k8s.io/client-go/pkg/version.gitMinor={minor}",
            ]
        )
        result: dict[str, Path] = {}
        for name in names:
            target = _cached_path(BINARIES[name])
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            _run_go(
                ["build", "-tags", "tools", "-ldflags", ldflags, "-o", str(partial), BINARIES[name].package],
                cwd=work,
                env=env,
                what=f"build {name} {KUBERNETES_VERSION}",
            )
            partial.rename(target)
            result[name] = target
        return result


_ETCD_MAIN = """package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def _build_single(binary: GoBinary) -> Path:
    env = _go_env()
    target = _cached_path(binary)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if binary.name == "etcd":
        with tempfile.TemporaryDirectory(prefix="finetune-etcd-build-") as tmp:
            work = Path(tmp)
            (work / "go.mod").write_text("module finetune.dev/etcdbuild\n\ngo 1.26\n")
            (work / "main.go").write_text(_ETCD_MAIN)
            _run_go(["get", f"{binary.module}@{binary.version}"], cwd=work, env=env, what="resolve etcd")
            _run_go(["mod", "tidy"], cwd=work, env=env, what="resolve etcd modules")
            _run_go(["build", "-ldflags", "-s -w", "-o", str(partial), "."], cwd=work, env=env, what="build etcd")
    else:
        with tempfile.TemporaryDirectory(prefix=f"finetune-{binary.name}-build-") as tmp:
            gobin = Path(tmp) / "bin"
            env["GOBIN"] = str(gobin)
            _run_go(
                ["install", "-ldflags", "-s -w", f"{binary.package}@{binary.version}"],
                cwd=Path(tmp),
                env=env,
                what=f"build {binary.name} {binary.version}",
            )
            shutil.move(str(gobin / binary.name), partial)
    partial.chmod(0o755)
    partial.rename(target)
    return target


def module_dir(name: str) -> Path:
    """The source of the Go module that builds ``name``, from the module cache (downloaded
    through the module proxy when missing): Kueue's CRDs and webhook manifests are read there,
    at the version of the binary, and never copied into this repository."""
    binary = BINARIES[name]
    env = _go_env()
    with tempfile.TemporaryDirectory(prefix=f"finetune-{name}-source-") as tmp:
        result = subprocess.run(
            [_go(), "mod", "download", "-json", f"{binary.module}@{binary.version}"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        directory = Path(json.loads(result.stdout)["Dir"])
    except (ValueError, KeyError):
        raise BinaryError(
            f"could not download the source of {binary.module}@{binary.version} "
            f"(go mod download said: {(result.stderr or result.stdout).strip()[:500]})"
        ) from None
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(CONTROL_PLANE)
    unknown = [n for n in names if n not in BINARIES]
    if unknown:
        print(f"unknown binary {unknown}; choose from {sorted(BINARIES)}", file=sys.stderr)
        return 2
    try:
        for name, path in ensure(names).items():
            print(f"{name}\t{path}")
    except BinaryError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
