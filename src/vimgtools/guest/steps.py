"""Typed operations on a guest (virt-customize style): frozen data a plan lists, prints and runs.

The runner lives in ``vimgtools.rekernel.apply``; loaders and the planner only build these.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Mkdir:
    path: str

    def describe(self) -> str:
        return f"mkdir -p {self.path}"


@dataclass(frozen=True)
class Upload:
    """Copy one host file into the guest."""

    src: str
    dst: str

    def describe(self) -> str:
        return f"copy {self.src} -> {self.dst}"


@dataclass(frozen=True)
class InstallModules:
    """Copy a module tree (symlinks as links), with modules.dep made by ``depmod -b`` on the host."""

    src: str
    dst: str
    version: str

    def describe(self) -> str:
        return f"copy modules {self.src} -> {self.dst} (depmod -b on the host)"


@dataclass(frozen=True)
class Move:
    src: str
    dst: str

    def describe(self) -> str:
        return f"move {self.src} -> {self.dst}"


@dataclass(frozen=True)
class RemoveDir:
    """Remove an empty directory."""

    path: str

    def describe(self) -> str:
        return f"rmdir {self.path}"


@dataclass(frozen=True)
class Remove:
    """Remove a file or a symlink (not a directory); absent is fine."""

    path: str
    why: str = ""

    def describe(self) -> str:
        return f"rm -f {self.path}" + (f"  # {self.why}" if self.why else "")


@dataclass(frozen=True)
class Symlink:
    target: str
    link: str

    def describe(self) -> str:
        return f"ln -s {self.target} {self.link}"


@dataclass(frozen=True)
class Write:
    """Write a text file; ``old`` is what was there (None: a new file), for diffs in dry runs."""

    path: str
    text: str
    old: str | None = None
    mode: int = 0o644

    def describe(self) -> str:
        return f"write {self.path}" if self.old is None else f"edit {self.path}"

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.old or "").splitlines(keepends=True),
                self.text.splitlines(keepends=True),
                fromfile=f"a{self.path}" if self.old is not None else "/dev/null",
                tofile=f"b{self.path}",
            )
        )


@dataclass(frozen=True)
class RunCommand:
    """Run a command inside the guest (a chroot in the appliance)."""

    argv: tuple[str, ...]
    why: str = ""
    attempts: int = 1  # tries in all, for a command known to fail now and then (grub-install)

    def describe(self) -> str:
        tries = f" (up to {self.attempts} tries)" if self.attempts > 1 else ""
        return "run " + " ".join(self.argv) + tries + (f"  # {self.why}" if self.why else "")


@dataclass(frozen=True)
class SetDefault:
    """Make the loader boot ``version`` by default (resolved against its regenerated config)."""

    loader: str
    version: str

    def describe(self) -> str:
        return f"{self.loader}: make {self.version} the default entry"


@dataclass(frozen=True)
class MountView:
    """Mount one guest's view of the disks (a shared system disk: every guest in turn)."""

    guest: str  # the guest's root disk image, for messages
    mountpoints: tuple[tuple[str, str], ...]  # (mountpoint, appliance device)

    def describe(self) -> str:
        mounts = ", ".join(f"{mp} {dev}" for mp, dev in self.mountpoints)
        return f"mount the view of {self.guest}: {mounts}"


Step = (
    MountView
    | Mkdir
    | Upload
    | InstallModules
    | Move
    | RemoveDir
    | Remove
    | Symlink
    | Write
    | RunCommand
    | SetDefault
)
