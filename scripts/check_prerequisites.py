"""What this machine needs before `make` goes on, checked up front: one sentence for each thing
missing, naming how to get it, instead of a traceback minutes later.

    python3 scripts/check_prerequisites.py setup     # the virtual environment
    python3 scripts/check_prerequisites.py cluster   # the local control plane (make demo, make test)

Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

MIN_PYTHON = (3, 11)
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def _binaries_at_hand() -> bool:
    """The control-plane binaries are cached or given (then Go is not needed)."""
    given = os.environ.get("FINETUNE_BIN_DIR")
    if given and all((Path(given) / n).is_file() for n in CONTROL_PLANE):
        return True
    root = Path(
        os.environ.get("FINETUNE_CACHE")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator")
    )
    return all(any((root / "bin").glob(f"{n}-*/{n}")) for n in CONTROL_PLANE)


def problems(what: str) -> list[str]:
    found: list[str] = []
    if sys.version_info < MIN_PYTHON:
        found.append(
            f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed, and {sys.executable} is "
            f"{sys.version.split()[0]}: install a newer python3, or give one with make PYTHON_BOOTSTRAP=python3.11"
        )
    if what == "setup" and importlib.util.find_spec("ensurepip") is None:
        found.append("Python's venv module cannot install pip here: install Debian's python3-venv package")
    if what == "cluster":
        if shutil.which("openssl") is None:
            found.append("openssl makes the local cluster's keys and certificates: install Debian's openssl package")
        if shutil.which("kubectl") is None:
            found.append(
                "kubectl talks to the local cluster: install it (Debian's kubernetes-client package, or the "
                "release binary from kubernetes.io) and put it on the PATH"
            )
        if shutil.which("unshare") is None:
            found.append("unshare runs the local pods in their own mount namespace: install Debian's util-linux")
        if shutil.which("go") is None and not _binaries_at_hand():
            found.append(
                "Go builds the control plane (etcd, kube-apiserver, ...) once: install Go 1.21 or newer (Debian's "
                "golang-go, or go.dev/dl), or set FINETUNE_BIN_DIR to a folder holding those four binaries"
            )
    return found


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "setup"
    missing = problems(what)
    for problem in missing:
        print(f"[prerequisites] {problem}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
