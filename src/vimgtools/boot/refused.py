"""Loaders detected so that they are refused clearly: LILO and zipl.

References: lilo.conf(5), zipl.conf(5). Both write a map of the kernel's blocks at install time, so a
swap needs their own tool run on a host of the guest's architecture (zipl: s390x) against the
guest's disk; that is not supported here yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from vimgtools.boot.base import Bootloader
from vimgtools.errors import BootloaderError

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts


class Lilo(Bootloader):
    """LILO (i386 NORD installs). Refused: its block map must be rewritten by /sbin/lilo."""

    name = "lilo"
    boot_code: ClassVar[str | None] = "lilo"

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        return "/etc/lilo.conf" in facts.files or facts.boot_code == "lilo"

    def refuse_if_unsupported(self, facts: GuestFacts) -> None:
        raise BootloaderError(
            f"{facts.root}: the guest boots with LILO (/etc/lilo.conf), which vimgtools cannot restamp: "
            "its block map must be rewritten by `lilo` for the new kernel. Switch the guest to GRUB 2 or "
            "extlinux, or run `lilo -r` on the mounted guest yourself after copying the kernel"
        )


class Zipl(Bootloader):
    """IBM Z loader. Refused: `zipl` must run on s390x against the guest's disk."""

    name = "zipl"

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        return "/etc/zipl.conf" in facts.files

    def refuse_if_unsupported(self, facts: GuestFacts) -> None:
        raise BootloaderError(
            f"{facts.root}: the guest boots with zipl (/etc/zipl.conf, IBM Z), which vimgtools cannot "
            "restamp: zipl writes the kernel's block list and must run on an s390x host"
        )
