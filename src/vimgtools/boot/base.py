"""The Bootloader interface: detect, steps (add an entry, make it the default, restamp), check the default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vimgtools.errors import BootloaderError

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts
    from vimgtools.guest.protocol import Guest
    from vimgtools.guest.steps import Step


@dataclass(frozen=True)
class BootEntry:
    """A boot entry, with paths as seen from the guest's root (``/boot/vmlinuz-VER``)."""

    title: str
    kernel: str
    initrd: str | None
    ident: str = ""  # what selects it: GRUB's saved_entry, an extlinux LABEL, a menu.lst index


def guest_path(facts: GuestFacts, loader_path: str) -> str:
    """A path as the loader sees it (relative to the filesystem holding /boot) -> path in the guest."""
    if facts.boot_separate and not loader_path.startswith("/boot/"):
        return "/boot" + loader_path
    return loader_path


class Bootloader:
    """One bootloader family. Subclasses implement the class methods and the three methods."""

    name: ClassVar[str] = "?"
    boot_code: ClassVar[str | None] = None  # what GuestFacts.boot_code says when it is installed

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        raise NotImplementedError

    def refuse_if_unsupported(self, facts: GuestFacts) -> None:
        """Raise BootloaderError when this loader cannot be restamped here."""

    def steps(self, facts: GuestFacts, version: str, initrd: bool) -> list[Step]:
        """Steps that add an entry for ``version``, keep the others, and make it the default."""
        raise NotImplementedError

    def set_default(self, gi: Guest, facts: GuestFacts, version: str) -> None:
        """Make the entry booting ``version`` the default (after the config has been regenerated)."""
        raise NotImplementedError

    def default_entry(self, gi: Guest, facts: GuestFacts) -> BootEntry:
        """The entry the loader boots by default, read from the disk."""
        raise NotImplementedError

    def entries(self, gi: Guest, facts: GuestFacts) -> list[BootEntry]:
        raise NotImplementedError

    def _no_entry(self, version: str, where: str) -> BootloaderError:
        return BootloaderError(f"{where}: no {self.name} entry boots kernel {version}")
