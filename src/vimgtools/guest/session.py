"""GuestImage: one libguestfs handle, one appliance launch, the OS inspection and the mounts.

This is the only module that touches the guestfs bindings; libguestfs reports every failure as a
bare ``RuntimeError``, which becomes a ``GuestError`` naming the call here, once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from vimgtools.errors import GuestError
from vimgtools.guest.bindings import load_guestfs

log = logging.getLogger("vimgtools.guest")


class GuestImage:
    """One libguestfs appliance over one disk image.

    Args:
        image: the disk image (raw, qcow2, ...).
        write: open read-write. With ``write=False`` writes still work but land in a throw-away
            overlay that libguestfs discards, which is how a dry run rehearses the real plan.
        fmt: the image format; pass it explicitly (probing a raw image's format is CVE-2010-3851).
    """

    def __init__(self, image: str | os.PathLike[str], *, write: bool = False, fmt: str = "raw") -> None:
        guestfs = load_guestfs()
        self.image = Path(image)
        self.writable = write
        self.fmt = fmt
        self.mounts: list[tuple[str, str]] = []  # (device, mountpoint) in mount order
        self.launch_seconds = 0.0
        try:
            self._g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        except RuntimeError as e:
            raise GuestError(f"cannot create a libguestfs handle: {e}") from e
        self._call("add_drive_opts", str(self.image), format=fmt, readonly=not write)
        t0 = time.monotonic()
        log.info(
            "launching the libguestfs appliance (%s)", os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "auto")
        )
        self._call("launch")
        self.launch_seconds = time.monotonic() - t0
        log.info("appliance up in %.1f s", self.launch_seconds)

    # -- plumbing ---------------------------------------------------------------------------------
    def _call(self, op: str, *args: Any, **kw: Any) -> Any:
        log.debug("guestfs %s%s%s", op, args, f" {kw}" if kw else "")
        t0 = time.monotonic()
        try:
            return getattr(self._g, op)(*args, **kw)
        except RuntimeError as e:
            raise GuestError(f"{op}{args!r}: {e}") from e
        finally:
            if (dt := time.monotonic() - t0) > 1.0:
                log.debug("guestfs %s took %.1f s", op, dt)

    def __getattr__(self, op: str) -> Any:
        """Any other guestfs call, with the same error wrapping: ``gi.is_file("/boot/x")``."""
        if op.startswith("_"):
            raise AttributeError(op)
        if not hasattr(self._g, op):
            raise AttributeError(f"libguestfs has no call {op!r}")

        def call(*args: Any, **kw: Any) -> Any:
            return self._call(op, *args, **kw)

        return call

    def __enter__(self) -> GuestImage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(commit=exc is None)

    def close(self, *, commit: bool = True) -> None:
        """Unmount, flush (``shutdown`` reports write errors, per guestfs(3)) and close."""
        try:
            if commit and self.writable:
                self._call("umount_all")
                self._call("shutdown")
        finally:
            self._g.close()

    # -- inspection and mounts --------------------------------------------------------------------
    def roots(self) -> list[str]:
        roots: list[str] = self._call("inspect_os")
        return roots

    def mount_root(self, root: str) -> None:
        """Mount ``root`` and its filesystems as the guest's fstab says, shortest mountpoint first."""
        mps: dict[str, str] = self._call("inspect_get_mountpoints", root)
        for mp, dev in sorted(mps.items(), key=lambda kv: (len(kv[0]), kv[0])):
            try:
                self._call("mount", dev, mp)
            except GuestError as e:
                if mp == "/":
                    raise
                log.warning("cannot mount %s on %s: %s", dev, mp, e)
                continue
            self.mounts.append((dev, mp))

    def remount(self) -> None:
        """Unmount everything and mount it again, dropping caches: later reads come from the disk."""
        self._call("sync")
        self._call("umount_all")
        self._call("drop_caches", 3)
        for dev, mp in self.mounts:
            self._call("mount", dev, mp)

    def exists(self, path: str) -> bool:
        return bool(self._call("exists", path))

    def text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist (symlinks followed)."""
        if not self._call("is_file", path, followsymlinks=True):
            return None
        data: bytes = self._call("read_file", path)
        return data.decode("utf-8", "replace")

    def readlink(self, path: str) -> str | None:
        if not self._call("is_symlink", path):
            return None
        target: str = self._call("readlink", path)
        return target

    def realpath(self, path: str) -> str:
        out: str = self._call("realpath", path)
        return out

    def run(self, argv: list[str] | tuple[str, ...]) -> str:
        """Run a command inside the guest (chroot of the mounted root, /dev /proc /sys bound)."""
        log.info("guest$ %s", " ".join(argv))
        t0 = time.monotonic()
        out: str = self._call("command", list(argv))
        log.debug("took %.1f s; output: %s", time.monotonic() - t0, out[-2000:])
        return out
