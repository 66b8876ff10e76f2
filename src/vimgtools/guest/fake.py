"""FakeGuest: a ``protocol.Guest`` in dicts (files, directories, symlinks), for tests in seconds.

No appliance: files are bytes in ``files``, directories paths in ``dirs``, symlinks targets in
``links``, all keyed by absolute, resolved paths. Path semantics follow libguestfs on Linux, traps
included: intermediate symlinks are followed (``/lib -> usr/lib``), ``is_file``/``is_dir``/
``is_symlink`` look at the last component itself, ``exists`` follows it, ``ln_s`` onto an existing
directory puts the link inside it, ``rmdir`` refuses a directory that is not empty. Commands given
to ``run`` are recorded in ``commands``; a handler in ``handlers`` (by the command's basename) may
act them out, and a name in ``failing`` makes them fail as a failing command would (GuestError).
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from vimgtools.errors import GuestError

if TYPE_CHECKING:
    from vimgtools.guest.protocol import Guest

Handler = Callable[["FakeGuest", tuple[str, ...]], str]
MAX_LINKS = 40  # as Linux's MAXSYMLINKS


class FakeGuest:
    """One guest root, already inspectable, in memory.

    Args:
        roots: what ``roots()`` (inspect_os) returns.
        mountpoints: mountpoint -> device, as ``inspect_get_mountpoints`` reports it (for every root).
        filesystems: device -> vfs type (default ext4).
        devices: device -> its first bytes (``pread_device``; default: 512 zero bytes).
        uuids, labels: device -> filesystem UUID / label (``list_filesystems`` lists every device
            named in ``filesystems``, ``uuids`` or ``mountpoints``).
        disks: what ``list_devices`` returns (default: the whole disks of the devices named).
        boot_free: bytes free on the filesystem holding /boot (``statvfs``).
    """

    def __init__(
        self,
        *,
        image: str = "fake.img",
        roots: Iterable[str] = ("/dev/sda1",),
        mountpoints: dict[str, str] | None = None,
        filesystems: dict[str, str] | None = None,
        devices: dict[str, bytes] | None = None,
        arch: str = "x86_64",
        distro: str = "debian",
        product: str = "Debian GNU/Linux 12 (bookworm)",
        boot_free: int = 2 << 30,
        uuids: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        disks: Iterable[str] | None = None,
    ) -> None:
        self.image = Path(image)
        self.launch_seconds = 0.0
        self.root_devices = list(roots)
        self.mountpoints = dict(mountpoints or {"/": self.root_devices[0]})
        self.filesystems = dict(filesystems or {})
        self.devices = dict(devices or {})
        self.arch, self.distro, self.product = arch, distro, product
        self.boot_free = boot_free
        self.uuids = dict(uuids or {})
        self.labels = dict(labels or {})
        self.disks = list(disks) if disks is not None else None
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/"}
        self.links: dict[str, str] = {}
        self.modes: dict[str, int] = {}
        self.commands: list[tuple[str, ...]] = []
        self.handlers: dict[str, Handler] = {}
        self.failing: set[str] = set()
        self.mounted: list[str] = []
        self.remounts = 0
        self.closed: bool | None = None  # None: open; else the ``commit`` it was closed with

    # -- building a guest (tests) ----------------------------------------------------------------
    def put(self, path: str, content: bytes | str = b"") -> FakeGuest:
        """Create a file (and its parent directories)."""
        self.mkdir_p(posixpath.dirname(path))
        self.write(path, content)
        return self

    def put_link(self, link: str, target: str) -> FakeGuest:
        """Create a symlink (and its parent directories); ``target`` as ``ln -s`` takes it."""
        self.mkdir_p(posixpath.dirname(link))
        self.ln_s(target, link)
        return self

    # -- paths ------------------------------------------------------------------------------------
    def _resolve(self, path: str, *, follow_last: bool = True, _depth: int = 0) -> str:
        """The path with every symlink followed (the last one only with ``follow_last``)."""
        if not path.startswith("/"):
            raise GuestError(f"{path}: a guest path must be absolute")
        parts = [p for p in path.split("/") if p and p != "."]
        cur = "/"
        for i, part in enumerate(parts):
            if part == "..":
                cur = posixpath.dirname(cur)
                continue
            nxt = posixpath.join(cur, part)
            if nxt in self.links and (follow_last or i < len(parts) - 1):
                if _depth >= MAX_LINKS:
                    raise GuestError(f"{path}: too many levels of symbolic links")
                target = self.links[nxt]
                cur = self._resolve(posixpath.join(cur, target), _depth=_depth + 1)
            else:
                cur = nxt
        return cur

    def _children(self, d: str) -> list[str]:
        prefix = d.rstrip("/") + "/"
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in (*self.files, *self.dirs, *self.links)
            if p.startswith(prefix) and p != d
        }
        return sorted(names)

    def _parent_dir(self, path: str) -> str:
        parent = self._resolve(posixpath.dirname(path))
        if parent not in self.dirs:
            raise GuestError(f"{path}: No such file or directory (no directory {parent})")
        return parent

    def _need(self, path: str, *, follow_last: bool = True) -> str:
        r = self._resolve(path, follow_last=follow_last)
        if r not in self.files and r not in self.dirs and r not in self.links:
            raise GuestError(f"{path}: No such file or directory")
        return r

    # -- inspection and mounts --------------------------------------------------------------------
    def roots(self) -> list[str]:
        return list(self.root_devices)

    def mount_root(self, root: str) -> None:
        if root not in self.root_devices:
            raise GuestError(f"mount_root: {root} is not a root of this guest")
        self.mounted = [dev for _mp, dev in sorted(self.mountpoints.items())]

    def remount(self) -> None:
        self.remounts += 1

    def mount_view(self, mountpoints: dict[str, str]) -> None:
        self.mountpoints = dict(mountpoints)
        self.mounted = [dev for _mp, dev in sorted(self.mountpoints.items())]

    def close(self, *, commit: bool = True) -> None:
        self.closed = commit

    def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return dict(self.mountpoints)

    def inspect_get_arch(self, root: str) -> str:
        return self.arch

    def file_architecture(self, path: str) -> str:
        self._need(path)
        return self.arch

    def inspect_get_distro(self, root: str) -> str:
        return self.distro

    def inspect_get_product_name(self, root: str) -> str:
        return self.product

    def vfs_type(self, device: str) -> str:
        return self.filesystems.get(device, "ext4")

    def statvfs(self, path: str) -> dict[str, int]:
        self._need(path)
        return {"bsize": 4096, "bavail": self.boot_free // 4096, "blocks": 2 * self.boot_free // 4096}

    def pread_device(self, device: str, count: int, offset: int) -> bytes:
        return self.devices.get(device, bytes(512))[offset : offset + count]

    def list_filesystems(self) -> dict[str, str]:
        devs = {*self.filesystems, *self.uuids, *self.mountpoints.values()}
        return {d: self.filesystems.get(d, "ext4") for d in sorted(devs)}

    def list_partitions(self) -> list[str]:
        return [d for d in self.list_filesystems() if re.match(r"/dev/[shv]d[a-z]+\d+$", d)]

    def list_devices(self) -> list[str]:
        if self.disks is not None:
            return list(self.disks)
        whole = {m.group(1) for d in self.list_filesystems() if (m := re.match(r"(/dev/[shv]d[a-z]+)", d))}
        return sorted(whole)

    def vfs_uuid(self, device: str) -> str:
        return self.uuids.get(device, "")

    def vfs_label(self, device: str) -> str:
        return self.labels.get(device, "")

    # -- reading ----------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        r = self._resolve(path)
        return r in self.files or r in self.dirs

    def is_file(self, path: str) -> bool:
        return self._resolve(path, follow_last=False) in self.files

    def is_dir(self, path: str) -> bool:
        return self._resolve(path, follow_last=False) in self.dirs

    def is_symlink(self, path: str) -> bool:
        return self._resolve(path, follow_last=False) in self.links

    def readlink(self, path: str) -> str | None:
        return self.links.get(self._resolve(path, follow_last=False))

    def realpath(self, path: str) -> str:
        r = self._resolve(path)
        if r not in self.files and r not in self.dirs:
            raise GuestError(f"realpath: {path}: No such file or directory")
        return r

    def ls(self, directory: str) -> list[str]:
        d = self._resolve(directory)
        if d not in self.dirs:
            raise GuestError(f"ls: {directory}: Not a directory")
        return self._children(d)

    def find(self, directory: str) -> list[str]:
        """Every path below ``directory``, relative to it (guestfs ``find``, without the top)."""
        d = self._resolve(directory)
        if d not in self.dirs:
            raise GuestError(f"find: {directory}: Not a directory")
        prefix = d.rstrip("/") + "/"
        return sorted(
            p[len(prefix) :] for p in (*self.files, *self.dirs, *self.links) if p.startswith(prefix)
        )

    def du(self, path: str) -> int:
        """KiB, as ``du -s``: each file rounded up to 1 KiB."""
        r = self._need(path)
        prefix = r.rstrip("/") + "/"
        return sum(-(-len(v) // 1024) for p, v in self.files.items() if p == r or p.startswith(prefix))

    def text(self, path: str) -> str | None:
        data = self.files.get(self._resolve(path))
        return None if data is None else data.decode("utf-8", "replace")

    def pread(self, path: str, count: int, offset: int) -> bytes:
        r = self._resolve(path)
        if r not in self.files:
            raise GuestError(f"pread: {path}: No such file")
        return self.files[r][offset : offset + count]

    def download(self, path: str, host_file: str) -> None:
        r = self._resolve(path)
        if r not in self.files:
            raise GuestError(f"download: {path}: No such file")
        Path(host_file).write_bytes(self.files[r])

    # -- changing ---------------------------------------------------------------------------------
    def mkdir_p(self, path: str) -> None:
        cur = "/"
        for part in [p for p in path.split("/") if p]:
            cur = self._resolve(posixpath.join(cur, part))
            if cur in self.files:
                raise GuestError(f"mkdir_p: {path}: {cur} is a file")
            self.dirs.add(cur)

    def write(self, path: str, content: bytes | str) -> None:
        self._parent_dir(path)
        r = self._resolve(path)
        if r in self.dirs:
            raise GuestError(f"write: {path}: Is a directory")
        self.files[r] = content.encode() if isinstance(content, str) else bytes(content)

    def chmod(self, mode: int, path: str) -> None:
        self.modes[self._need(path)] = mode

    def upload(self, host_file: str, path: str) -> None:
        self.write(path, Path(host_file).read_bytes())

    def tar_in(self, host_tarfile: str, directory: str) -> None:
        d = self._resolve(directory)
        if d not in self.dirs:
            raise GuestError(f"tar_in: {directory}: Not a directory")
        with tarfile.open(host_tarfile) as t:
            for m in t.getmembers():
                name = posixpath.normpath(m.name).lstrip("/")
                if name in ("", ".") or name.startswith(".."):
                    continue
                path = posixpath.join(d, name)
                if m.isdir():
                    self.mkdir_p(path)
                elif m.issym():
                    self.put_link(path, m.linkname)
                elif m.isfile():
                    f = t.extractfile(m)
                    assert f is not None
                    self.put(path, f.read())

    def mv(self, src: str, dst: str) -> None:
        s = self._need(src, follow_last=False)
        d = self._resolve(dst)
        if d in self.dirs:
            d = posixpath.join(d, posixpath.basename(s))
        self._parent_dir(d)
        if d in self.files or d in self.dirs or d in self.links:
            raise GuestError(f"mv: {dst}: exists")

        def moved(p: str) -> str:
            return d + p[len(s) :] if p == s or p.startswith(s + "/") else p

        self.files = {moved(p): v for p, v in self.files.items()}
        self.dirs = {moved(p) for p in self.dirs}
        self.links = {moved(p): v for p, v in self.links.items()}
        self.modes = {moved(p): v for p, v in self.modes.items()}

    def rmdir(self, path: str) -> None:
        r = self._resolve(path, follow_last=False)
        if r not in self.dirs:
            raise GuestError(f"rmdir: {path}: Not a directory")
        if self._children(r):
            raise GuestError(f"rmdir: {path}: Directory not empty")
        self.dirs.discard(r)

    def rm(self, path: str) -> None:
        r = self._need(path, follow_last=False)
        if r in self.dirs:
            raise GuestError(f"rm: {path}: Is a directory")
        self.files.pop(r, None)
        self.links.pop(r, None)

    def rm_f(self, path: str) -> None:
        r = self._resolve(path, follow_last=False)
        if r in self.dirs:
            raise GuestError(f"rm_f: {path}: Is a directory")
        self.files.pop(r, None)
        self.links.pop(r, None)

    def rm_rf(self, path: str) -> None:
        r = self._resolve(path, follow_last=False)
        if r == "/":
            raise GuestError("rm_rf: refusing /")

        def under(p: str) -> bool:
            return p == r or p.startswith(r + "/")

        self.files = {p: v for p, v in self.files.items() if not under(p)}
        self.dirs = {p for p in self.dirs if not under(p)}
        self.links = {p: v for p, v in self.links.items() if not under(p)}

    def ln_s(self, target: str, link: str) -> None:
        r = self._resolve(link)
        if r in self.dirs:  # ln -s onto an existing directory: the link lands inside it
            r = posixpath.join(r, posixpath.basename(target))
        else:
            r = self._resolve(link, follow_last=False)
        self._parent_dir(r)
        if r in self.files or r in self.dirs or r in self.links:
            raise GuestError(f"ln_s: {link}: File exists")
        self.links[r] = target

    def run(self, argv: list[str] | tuple[str, ...]) -> str:
        cmd = tuple(argv)
        self.commands.append(cmd)
        name = posixpath.basename(cmd[0])
        if name in self.failing or cmd[0] in self.failing:
            raise GuestError(f"command{list(cmd)!r}: {name} failed (FakeGuest.failing)")
        handler = self.handlers.get(name)
        return handler(self, cmd) if handler else ""


if TYPE_CHECKING:
    _satisfies_the_protocol: type[Guest] = FakeGuest
