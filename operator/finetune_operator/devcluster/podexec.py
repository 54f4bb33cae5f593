"""Start one container's process for the node agent: bind-mount its volumes, then exec.

Runs inside ``unshare --mount --propagation private``, so the bind mounts are
seen by this process tree only and vanish with it; the host keeps no trace but
the (empty) mount point directories, which the agent removes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    for mount in spec["mounts"]:
        subprocess.run(["mount", "--bind", mount["source"], mount["target"]], check=True)
        if mount["readOnly"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", mount["target"]], check=True)
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
