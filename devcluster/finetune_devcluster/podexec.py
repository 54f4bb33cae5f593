"""Start one container's process for the node agent: mount its volumes where the pod spec
says, then exec.

Runs inside a mount namespace of its own (``unshare --mount --propagation private``; for a user
who is not root, inside a user namespace too, ``--user --map-root-user``, where the same mounts
are allowed), so every mount is seen by this process tree only and vanishes with it.  Nothing is
created on the host: a mount target that does not exist (``/etc/finetune``, ``/data``,
``/dev/termination-log``) is made in a *shadow* of the nearest directory above it that does: a
tmpfs over that directory, holding a bind mount of each of its entries (so it looks the same)
and the new target beside them.  The root directory cannot be covered in place, so for a
target at the top (``/data``) the process gets a new root: a tmpfs with every top-level entry
bind-mounted (with the mounts below it), entered with ``chroot``.  That is what bubblewrap and
rootless podman do with an image's root; here the host's tree is the image.

Every source is opened before the first mount and mounted through its file descriptor: a
volume mounted at ``/tmp`` must not hide the sources of the others when the node agent's
state directory lives under ``/tmp`` too.

A container with ``readOnlyRootFilesystem`` gets what a container runtime gives it: once the
volumes are in place, every other mount of its view is made read-only (``/proc``, ``/sys`` and
``/dev`` stay as they are, as a runtime mounts them apart from the image), so a write anywhere
but a volume fails as in the real pod. The few host files the agent hands the process by path
(the termination-message file, a volume it could not mount) are bind-mounted onto themselves
first and stay writable.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
# statvfs's flags for the access-time modes, which differ from mount's for relatime.
ST_NOATIME = 0x400
ST_NODIRATIME = 0x800
ST_RELATIME = 0x1000
# The flags a bind mount inherits from the mount it shows, which a remount inside a user
# namespace must keep (the kernel locks them): statvfs reports them with the same values.
_LOCKED = MS_NOSUID | MS_NODEV | MS_NOEXEC


class ShadowError(OSError):
    """A directory this namespace cannot cover: ``/dev`` in a user namespace, where device
    nodes below a tmpfs made there cannot be opened (the kernel marks such mounts nodev)."""


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the host's."""
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


class Mounter:
    def __init__(self, scratch: str) -> None:
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.scratch = scratch
        self.shadowed: set[str] = set()
        # Targets a volume is mounted on: a mount point below one is made in the volume itself,
        # as a kubelet makes it.
        self.volumes: set[str] = set()
        self.rooted = False
        self._count = 0

    def mount(self, source: str | None, target: str, flags: int, fstype: str | None = None) -> None:
        result = self.libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None, flags, None
        )
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {source or '(remount)'} on {target}: {os.strerror(errno)}")

    def bind(self, source: str, target: str, *, read_only: bool = False) -> None:
        self.mount(source, target, MS_BIND | MS_REC)
        if read_only:
            self.remount_read_only(target)

    def remount_read_only(self, target: str) -> None:
        """Make the mount at ``target`` read-only, keeping the flags a user namespace locks
        (nosuid, nodev, noexec and the access-time mode)."""
        flags = os.statvfs(target).f_flag
        kept = flags & _LOCKED
        if flags & ST_NOATIME:
            kept |= MS_NOATIME
        elif not flags & ST_RELATIME:
            kept |= MS_STRICTATIME
        if flags & ST_NODIRATIME:
            kept |= MS_NODIRATIME
        self.mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)

    def read_only_root(self, writable: list[str]) -> None:
        """Every mount but the volumes, ``writable`` and the kernel's own (/proc, /sys, /dev)
        read-only: a root file system as ``readOnlyRootFilesystem`` makes it."""
        for path in writable:
            if os.path.lexists(path):
                self.mount(path, path, MS_BIND)
                self.volumes.add(os.path.normpath(path))
        keep = [*self.volumes, "/proc", "/sys", "/dev"]
        for point in mount_points():
            if any(point == k or point.startswith(k.rstrip("/") + "/") for k in keep):
                continue
            try:
                self.remount_read_only(point)
            except PermissionError:
                # Below a folder this user may not enter: it cannot write there either.
                continue

    def _scratch(self, what: str) -> str:
        self._count += 1
        path = os.path.join(self.scratch, f"{what}-{self._count}")
        os.makedirs(path, exist_ok=True)
        return path

    def make_target(self, target: str, *, is_dir: bool) -> None:
        """Make ``target`` exist in this namespace's view, changing nothing on the host."""
        parts = [p for p in target.split("/") if p]
        here = "/"
        for index, part in enumerate(parts):
            path = os.path.join(here, part)
            if os.path.lexists(path):
                here = path
                continue
            if here not in self.shadowed and here not in self.volumes:
                self.shadow(here)
            last = index == len(parts) - 1
            if last and not is_dir:
                with open(path, "w"):
                    pass
            else:
                os.mkdir(path)
            here = path

    def shadow(self, directory: str) -> None:
        """Cover ``directory`` with a tmpfs that shows what it held (each entry bind-mounted
        from a view of the original), where new entries can be made."""
        if directory == "/":
            self._new_root()
            return
        if directory == "/dev" and in_user_namespace():
            raise ShadowError(f"{directory} cannot be shadowed in a user namespace")
        original = self._scratch("original")
        self.bind(directory, original)
        self.mount("tmpfs", directory, 0, "tmpfs")
        self._fill(directory, original)
        self.shadowed.add(directory)

    def _new_root(self) -> None:
        root = self._scratch("root")
        self.mount("tmpfs", root, 0, "tmpfs")
        self._fill(root, "/")
        os.chroot(root)
        os.chdir("/")
        self.rooted = True
        self.shadowed.add("/")

    def _fill(self, directory: str, original: str) -> None:
        for name in os.listdir(original):
            source = os.path.join(original, name)
            target = os.path.join(directory, name)
            info = os.lstat(source)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(source), target)
                continue
            if stat.S_ISDIR(info.st_mode):
                os.mkdir(target)
            else:
                with open(target, "w"):
                    pass
            try:
                self.bind(source, target)
            except OSError:
                # An entry this user may not even look at (another user's home): left empty.
                continue


def mount_points() -> list[str]:
    """The mount points of this process's view (relative to its root), outermost first."""
    seen: list[str] = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            point = point.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            point = point.replace("\\134", "\\")
            if point not in seen:
                seen.append(point)
    return sorted(seen, key=lambda p: len([part for part in p.split("/") if part]))


# The exit code of a container that could not be started (its mounts), with the reason in the
# spec's ``startError`` file: the agent reports it as a kubelet does, CreateContainerError.
START_FAILED = 125


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    try:
        prepare(spec, argv[1])
    except OSError as exc:
        message = f"cannot mount the container's volumes: {exc}"[:1000]
        if spec.get("startError"):
            with open(spec["startError"], "w") as handle:
                handle.write(message)
        print(f"podexec: {message}", file=sys.stderr)
        return START_FAILED
    argv_out = spec["argv"]
    if spec.get("startedFile"):
        # The container starts now (what the agent waits for before it reports Running): the
        # file exists already, empty, so that it can be written under a read-only root.
        with open(spec["startedFile"], "w") as handle:
            handle.write("started\n")
    try:
        os.execvpe(argv_out[0], argv_out, spec["env"])
    except FileNotFoundError:
        print(f"exec {argv_out[0]!r}: not found on PATH {spec['env'].get('PATH', '')}", file=sys.stderr)
        return 127
    return 0  # unreachable: exec replaced this process


def prepare(spec: dict[str, Any], spec_path: str) -> None:
    """Every mount of ``spec`` in place, and the working directory."""
    mounts = sorted(spec["mounts"], key=lambda m: len([p for p in m["target"].split("/") if p]))
    mounter = Mounter(spec.get("scratch") or os.path.dirname(os.path.abspath(spec_path)))
    # Sources first, by descriptor: no mount below may hide one of them.
    descriptors = [os.open(mount["source"], os.O_PATH) for mount in mounts]
    for mount, fd in zip(mounts, descriptors, strict=True):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        try:
            mounter.make_target(mount["target"], is_dir=is_dir)
        except ShadowError as exc:
            # (The termination message, /dev/termination-log: the agent names its file in
            # FINETUNE_TERMINATION_LOG too.)
            print(f"podexec: {mount['target']} not mounted: {exc}", file=sys.stderr)
            continue
        mounter.bind(f"/proc/self/fd/{fd}", mount["target"], read_only=bool(mount["readOnly"]))
        mounter.volumes.add(os.path.normpath(mount["target"]))
    for fd in descriptors:
        os.close(fd)
    if spec.get("readOnlyRoot"):
        mounter.read_only_root([str(path) for path in spec.get("writable", [])])
    cwd = spec.get("cwd") or "/"
    os.chdir(cwd if os.path.isdir(cwd) else "/")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
