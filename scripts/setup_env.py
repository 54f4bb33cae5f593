"""Create the project's virtual environment, reusing one cached outside the repo.

Two layers, so that a fresh clone is ready in seconds and torch (several GB)
is installed once per machine, not once per clone:

* the dependency venv, ``$FINETUNE_CACHE/venv-py3.X``: every third-party
  package of every extra, pinned by ``constraints.txt``; reinstalled only when
  the requirement list or the pins change (a stamp file records them);
* ``.venv`` in the clone: a small venv whose site-packages point at the
  dependency venv (a ``.pth`` file) with this project installed editable, and
  the dependency venv's console scripts re-pointed at ``.venv/bin/python`` so
  that ``accelerate launch -m finetune_trainer`` finds the project.

Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("operator", "trainer", "dev")


def cache_dir() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator"
    )
    return Path(root)


def log(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs.extend(project["optional-dependencies"][extra])
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return sorted(set(reqs + build))


def site_packages(venv_dir: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv_dir / "lib" / version / "site-packages"


def ensure_deps_venv() -> Path:
    deps = cache_dir() / f"venv-py{sys.version_info.major}.{sys.version_info.minor}"
    reqs = requirements()
    constraints = (ROOT / "constraints.txt").read_text()
    digest = hashlib.sha256(("\n".join(reqs) + "\n--\n" + constraints).encode()).hexdigest()
    stamp = deps / ".finetune-stamp"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return deps
    if not (deps / "bin" / "python").exists():
        log(f"creating the dependency venv {deps}")
        venv.EnvBuilder(with_pip=True, clear=False).create(deps)
    log(f"installing {len(reqs)} requirements into {deps} (torch is large: minutes on a cold machine)")
    req_file = deps / "requirements.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    subprocess.run(
        [str(deps / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"],
        check=True,
    )
    subprocess.run(
        [
            str(deps / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-r",
            str(req_file),
            "-c",
            str(ROOT / "constraints.txt"),
        ],
        check=True,
    )
    stamp.write_text(digest + "\n")
    return deps


def relink_scripts(deps: Path, local: Path) -> None:
    """Give ``.venv/bin`` a copy of each dependency script, run by ``.venv``'s python."""
    python = local / "bin" / "python"
    for script in sorted((deps / "bin").iterdir()):
        target = local / "bin" / script.name
        if script.name.startswith(("python", "activate", "pip")) or not script.is_file():
            continue
        try:
            head = script.read_bytes()[:256]
        except OSError:
            continue
        if not head.startswith(b"#!") or b"python" not in head.split(b"\n", 1)[0]:
            # A native binary (ruff, hadolint): a link is enough.
            if os.access(script, os.X_OK) and not target.exists():
                target.symlink_to(script)
            continue
        body = script.read_text().split("\n", 1)[1]
        if target.exists() and not target.is_symlink():
            current = target.read_text(errors="replace")
            if current.split("\n", 1)[-1] == body:
                continue
        target.unlink(missing_ok=True)
        target.write_text(f"#!{python}\n{body}")
        target.chmod(0o755)


def ensure_local_venv(deps: Path) -> Path:
    local = ROOT / ".venv"
    if not (local / "bin" / "python").exists():
        log(f"creating {local}")
        venv.EnvBuilder(with_pip=True).create(local)
    pth = site_packages(local) / "_finetune_deps.pth"
    pth.write_text(str(site_packages(deps)) + "\n")
    marker = local / ".finetune-editable"
    pyproject_digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not marker.is_file() or marker.read_text().strip() != pyproject_digest:
        log("installing finetune-operator (editable) into .venv")
        subprocess.run(
            [
                str(local / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(ROOT),
            ],
            check=True,
        )
        marker.write_text(pyproject_digest + "\n")
    relink_scripts(deps, local)
    return local


def main() -> int:
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        log("a free-threaded Python is not supported; use CPython 3.11+")
        return 2
    deps = ensure_deps_venv()
    local = ensure_local_venv(deps)
    log(f"ready: {local}/bin/python (dependencies from {deps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
