"""GuestImage: one libguestfs handle, one appliance launch, the OS inspection and the mounts.

This is the only module that touches the guestfs bindings; libguestfs reports every failure as a
bare ``RuntimeError``, which becomes a ``GuestError`` naming the call here, once. GuestImage offers
the calls of ``protocol.Guest`` (what rekernel uses; mypy checks it satisfies the protocol) and a
few more for tests (``rm``); anything else is ``call(op, *args)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vimgtools.errors import GuestError
from vimgtools.guest.bindings import load_guestfs

if TYPE_CHECKING:
    from vimgtools.guest.protocol import Guest

log = logging.getLogger("vimgtools.guest")


class GuestImage:
    """One libguestfs appliance over one disk image.

    Args:
        image: the disk image (raw, qcow2, ...).
        write: open read-write. With ``write=False`` writes still work but land in a throw-away
            overlay that libguestfs discards, which is how a dry run rehearses the real plan.
        fmt: the image format; pass it explicitly (probing a raw image's format is CVE-2010-3851).
        more: the guest's further disks, same format, in the order the guest sees them.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        write: bool = False,
        fmt: str = "raw",
        more: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        guestfs = load_guestfs()
        self.image = Path(image)
        self.writable = write
        self.fmt = fmt
        self.mounts: list[tuple[str, str]] = []  # (device, mountpoint) in mount order
        self.launch_seconds = 0.0
        self._filesystems: dict[str, str] | None = None
        self._ids: dict[tuple[str, str], str] = {}
        try:
            self._g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
        except RuntimeError as e:
            raise GuestError(f"cannot create a libguestfs handle: {e}") from e
        self._call("add_drive_opts", str(self.image), format=fmt, readonly=not write)
        for other in more:  # the guest's further disks: /dev/sdb, /dev/sdc, ... in this order
            self._call("add_drive_opts", str(other), format=fmt, readonly=not write)
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

    def call(self, op: str, *args: Any, **kw: Any) -> Any:
        """Any other guestfs call, with the same error wrapping: ``gi.call("lvs")``."""
        return self._call(op, *args, **kw)

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

    def mount_view(self, mountpoints: dict[str, str]) -> None:
        """Unmount everything, then mount ``mountpoints`` (guest mountpoint -> device), shortest first.

        One guest's view when several guests' disks are in the appliance (a shared system disk):
        ``remount`` and ``close`` then work on this view.
        """
        self._call("umount_all")
        self.mounts = []
        for mp, dev in sorted(mountpoints.items(), key=lambda kv: (len(kv[0]), kv[0])):
            self._call("mount", dev, mp)
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

    # -- the rest of protocol.Guest: thin typed calls ----------------------------------------------
    def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        out: dict[str, str] = self._call("inspect_get_mountpoints", root)
        return out

    def inspect_get_arch(self, root: str) -> str:
        return str(self._call("inspect_get_arch", root))

    def file_architecture(self, path: str) -> str:
        return str(self._call("file_architecture", path))

    def inspect_get_distro(self, root: str) -> str:
        return str(self._call("inspect_get_distro", root))

    def inspect_get_product_name(self, root: str) -> str:
        return str(self._call("inspect_get_product_name", root))

    def vfs_type(self, device: str) -> str:
        return str(self._call("vfs_type", device))

    def statvfs(self, path: str) -> dict[str, int]:
        out: dict[str, int] = self._call("statvfs", path)
        return out

    def pread_device(self, device: str, count: int, offset: int) -> bytes:
        return bytes(self._call("pread_device", device, count, offset))

    def list_devices(self) -> list[str]:
        out: list[str] = self._call("list_devices")
        return out

    def list_partitions(self) -> list[str]:
        out: list[str] = self._call("list_partitions")
        return out

    def list_filesystems(self) -> dict[str, str]:
        """Every filesystem of the appliance's disks, asked once per launch.

        libguestfs probes every device (15-25 s with three disks under TCG); rekernel creates no
        filesystem, so the answer does not change during a run.
        """
        if self._filesystems is None:
            self._filesystems = dict(self._call("list_filesystems"))
        return dict(self._filesystems)

    def vfs_uuid(self, device: str) -> str:
        return self._fs_id("vfs_uuid", device)

    def vfs_label(self, device: str) -> str:
        return self._fs_id("vfs_label", device)

    def _fs_id(self, op: str, device: str) -> str:
        # Asked once per filesystem and launch, as list_filesystems: rekernel changes no UUID or label.
        key = (op, device)
        if key not in self._ids:
            self._ids[key] = str(self._call(op, device))
        return self._ids[key]

    def find(self, directory: str) -> list[str]:
        out: list[str] = self._call("find", directory)
        return out

    def is_file(self, path: str) -> bool:
        return bool(self._call("is_file", path))

    def is_dir(self, path: str) -> bool:
        return bool(self._call("is_dir", path))

    def is_symlink(self, path: str) -> bool:
        return bool(self._call("is_symlink", path))

    def ls(self, directory: str) -> list[str]:
        out: list[str] = self._call("ls", directory)
        return out

    def du(self, path: str) -> int:
        return int(self._call("du", path))

    def pread(self, path: str, count: int, offset: int) -> bytes:
        return bytes(self._call("pread", path, count, offset))

    def download(self, path: str, host_file: str) -> None:
        self._call("download", path, host_file)

    def mkdir_p(self, path: str) -> None:
        self._call("mkdir_p", path)

    def write(self, path: str, content: bytes | str) -> None:
        self._call("write", path, content)

    def chmod(self, mode: int, path: str) -> None:
        self._call("chmod", mode, path)

    def upload(self, host_file: str, path: str) -> None:
        self._call("upload", host_file, path)

    def tar_in(self, host_tarfile: str, directory: str) -> None:
        self._call("tar_in", host_tarfile, directory)

    def mv(self, src: str, dst: str) -> None:
        self._call("mv", src, dst)

    def rmdir(self, path: str) -> None:
        self._call("rmdir", path)

    def rm(self, path: str) -> None:
        self._call("rm", path)

    def rm_f(self, path: str) -> None:
        self._call("rm_f", path)

    def rm_rf(self, path: str) -> None:
        self._call("rm_rf", path)

    def ln_s(self, target: str, link: str) -> None:
        self._call("ln_s", target, link)


if TYPE_CHECKING:
    _satisfies_the_protocol: type[Guest] = GuestImage
