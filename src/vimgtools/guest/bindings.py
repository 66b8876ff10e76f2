"""Find libguestfs's Python bindings (``guestfs.py`` and ``libguestfsmod``), also from a venv.

The mechanism is ``vimgtools.bindings`` (the system's bindings of a C library, loaded from a
venv of the same Python minor version); this module names libguestfs's files and packages.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from vimgtools import bindings
from vimgtools.errors import GuestError

SYSTEM_DIRS = bindings.SYSTEM_DIRS

MISSING = (
    "libguestfs Python bindings for Python {ver} are not installed: "
    "Debian/Ubuntu `apt-get install python3-guestfs`, Fedora/RHEL `dnf install python3-libguestfs`, "
    "openSUSE `zypper install python3-libguestfs`, Arch `pacman -S libguestfs`"
)


def find_system_bindings() -> tuple[Path, Path] | None:
    """The system's ``guestfs.py`` and a ``libguestfsmod`` this interpreter can load."""
    return bindings.find_system_module("guestfs", "libguestfsmod", SYSTEM_DIRS)


def load_guestfs() -> ModuleType:
    """Import and return the ``guestfs`` module, wherever the system put it.

    Raises:
        GuestError: the bindings are missing for this Python; the message names the package.
    """
    try:
        return bindings.load_system_module(
            "guestfs", "libguestfsmod", MISSING, label="libguestfs", dirs=SYSTEM_DIRS
        )
    except bindings.BindingsMissing as e:
        raise GuestError(str(e)) from e.__cause__
