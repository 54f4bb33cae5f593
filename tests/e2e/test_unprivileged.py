"""`make demo` as most people first try a project: as a user who is not root.

The demo's FineTuneJob runs through the node agent, whose pods get their own mount namespace
(inside a user namespace of their own), with every mount target the pod spec names made in
that view only.  Nothing is created or mounted outside the checkout, the cache and the temp
folder.  CI runs as root, so the test drops to ``nobody`` in a private mount namespace where
root's cache (the venv, the binaries) is reachable, as it is in any user's own home.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Where a pod's mount points were made on the host before: these must not change.
WATCHED = ("/", "/etc", "/dev", "/var", "/mnt", "/opt", "/srv", "/home")


def _listing() -> dict[str, list[str]]:
    return {folder: sorted(os.listdir(folder)) for folder in WATCHED if os.path.isdir(folder)}


def _cache() -> Path:
    root = os.environ.get("FINETUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator"
    )
    return Path(root).resolve()


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder in the system's temp folder (pytest's own is closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix="demo-unprivileged-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_demo_job_runs_on_the_node_agent_as_a_user_who_is_not_root(work: Path) -> None:
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.fail("setpriv and unshare (util-linux) are needed to drop to an ordinary user")
    (work / "home").mkdir(parents=True)
    (work / "keep").mkdir()
    state = work / "state"
    cache = _cache()
    demo = [sys.executable, "-m", "finetune_devcluster.demo", "--state-dir", str(state), "--timeout", "600"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work / "home"),
        "FINETUNE_CACHE": str(cache),
        "TMPDIR": str(work),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if os.geteuid() == 0:
        shutil.chown(work, user="nobody", group="nogroup")
        for path in (work / "home", work / "keep"):
            shutil.chown(path, user="nobody", group="nogroup")
        # A private mount namespace (gone with the command): /root stays closed to others on the
        # host, and here only the cache is put where its paths say it is.
        script = (
            "set -e\n"
            f"mount --bind {cache} {work / 'keep'}\n"
            "mount -t tmpfs -o mode=755 tmpfs /root\n"
            f"mkdir -p {cache}\n"
            f"mount --bind {work / 'keep'} {cache}\n"
            'exec setpriv --reuid=nobody --regid=nogroup --clear-groups --reset-env -- env "$@"\n'
        )
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]
        argv += [f"{k}={v}" for k, v in env.items()] + demo
        if not str(cache).startswith("/root/"):
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "env"]
            argv += [f"{k}={v}" for k, v in env.items()] + demo
    else:
        argv = ["env", *[f"{k}={v}" for k, v in env.items()], *demo]
    before = _listing()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "==> done." in output and "Succeeded" in output
    assert _listing() == before, "the demo created something outside the checkout, the cache and the temp folder"
    # What the job wrote is the demo user's, in the demo's own state folder.
    outputs = state / "volumes" / "demo" / "outputs" / "demo"
    assert (outputs / "demo.safetensors").is_file()
    if os.geteuid() == 0:
        assert (outputs / "demo.safetensors").stat().st_uid == 65534
