"""Bootloader handlers behind one small interface, and ``detect(facts)`` to pick the guest's one.

A handler turns plain facts into steps (pure, unit-tested on config text), and at apply time
resolves and checks the default entry against the regenerated configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vimgtools.boot.base import BootEntry, Bootloader
from vimgtools.boot.extlinux import Extlinux
from vimgtools.boot.grub2 import Grub2
from vimgtools.boot.grub_legacy import GrubLegacy
from vimgtools.boot.refused import Lilo, Zipl
from vimgtools.errors import BootloaderError

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts

# Most specific first: a guest with leftovers of several loaders gets the one its sector 0 runs.
LOADERS: tuple[type[Bootloader], ...] = (Grub2, Extlinux, GrubLegacy, Lilo, Zipl)


def detect(facts: GuestFacts) -> Bootloader:
    """The guest's bootloader handler.

    Raises:
        BootloaderError: none recognised, or one that cannot be restamped (LILO, zipl).
    """
    found = [cls() for cls in LOADERS if cls.detect(facts)]
    if not found:
        raise BootloaderError(
            f"{facts.root}: no bootloader configuration found (looked for GRUB 2 grub.cfg, extlinux.conf, "
            "GRUB legacy menu.lst, lilo.conf, zipl.conf)"
        )
    code = facts.boot_code
    # Prefer the loader whose boot code is in sector 0 when several configs are present.
    for loader in found:
        if code and loader.boot_code == code:
            chosen = loader
            break
    else:
        chosen = found[0]
    chosen.refuse_if_unsupported(facts)
    return chosen


__all__ = ["LOADERS", "BootEntry", "Bootloader", "Extlinux", "Grub2", "GrubLegacy", "Lilo", "Zipl", "detect"]
