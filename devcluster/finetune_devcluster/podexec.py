"""Start one container's process for the node agent: bind-mount its volumes, then exec.

Runs inside ``unshare --mount --propagation private``, so the bind mounts are seen by this
process tree only and vanish with it; the host keeps no trace but the (empty) mount point
directories, which the agent removes.

Every source is opened before the first mount and mounted through its file descriptor: a
volume mounted at ``/tmp`` must not hide the sources of the others when the node agent's
state directory lives under ``/tmp`` too.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000


def _mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> None:
    result = libc.mount(source.encode() if source else None, target.encode(), None, flags, None)
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source or '(remount)'} on {target}: {os.strerror(errno)}")


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    mounts = spec["mounts"]
    descriptors = [os.open(mount["source"], os.O_PATH) for mount in mounts]
    for mount, fd in zip(mounts, descriptors, strict=True):
        _mount(libc, f"/proc/self/fd/{fd}", mount["target"], MS_BIND | MS_REC)
        if mount["readOnly"]:
            _mount(libc, None, mount["target"], MS_REMOUNT | MS_BIND | MS_RDONLY)
    for fd in descriptors:
        os.close(fd)
    cwd = spec.get("cwd") or "/"
    os.chdir(cwd if os.path.isdir(cwd) else "/")
    argv_out = spec["argv"]
    try:
        os.execvpe(argv_out[0], argv_out, spec["env"])
    except FileNotFoundError:
        print(f"exec {argv_out[0]!r}: not found on PATH {spec['env'].get('PATH', '')}", file=sys.stderr)
        return 127
    return 0  # unreachable: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
