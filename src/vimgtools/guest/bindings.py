"""Find libguestfs's Python bindings, also from a virtualenv that cannot see them.

Distributions install the bindings (``guestfs.py`` and the C module
``libguestfsmod``) for their own interpreter only, e.g. Debian's
``/usr/lib/python3/dist-packages``. A venv made from another build of the same
Python minor version can load that C module as it is (same ABI tag), so we load
exactly these two modules from the system directory, without putting the rest
of the system's packages on ``sys.path``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from vimgtools.errors import GuestError

SYSTEM_DIRS = (
    "/usr/lib/python3/dist-packages",  # Debian, Ubuntu
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",  # Fedora, RHEL, SUSE
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",  # Arch, Alpine
)

MISSING = (
    "libguestfs Python bindings for Python {ver} are not installed: "
    "Debian/Ubuntu `apt-get install python3-guestfs`, Fedora/RHEL `dnf install python3-libguestfs`, "
    "openSUSE `zypper install python3-libguestfs`, Arch `pacman -S libguestfs`"
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def find_system_bindings() -> tuple[Path, Path] | None:
    """The system's ``guestfs.py`` and a ``libguestfsmod`` this interpreter can load."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for d in map(Path, SYSTEM_DIRS):
        py = d / "guestfs.py"
        if not py.is_file():
            continue
        for suffix in suffixes:
            so = d / f"libguestfsmod{suffix}"
            if so.is_file():
                return py, so
    return None


def load_guestfs() -> ModuleType:
    """Import and return the ``guestfs`` module, wherever the system put it.

    Raises:
        GuestError: the bindings are missing for this Python; the message names the package.
    """
    try:
        import guestfs

        return guestfs  # type: ignore[no-any-return]
    except ImportError:
        pass
    found = find_system_bindings()
    if found is None:
        raise GuestError(MISSING.format(ver=sysconfig.get_python_version()))
    py, so = found
    try:
        _load("libguestfsmod", so)
        return _load("guestfs", py)
    except ImportError as e:
        raise GuestError(f"{so}: cannot load the libguestfs bindings: {e}") from e
