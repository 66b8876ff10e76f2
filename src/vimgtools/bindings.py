"""Find the system's Python bindings of C libraries (libnbd, libvirt; libguestfs through ``guest.bindings``) from a venv.

Distributions install such bindings (a ``NAME.py`` and its C module) for their own
interpreter only, e.g. Debian's ``/usr/lib/python3/dist-packages``. A venv made from
another build of the same Python minor version can load that C module as it is (same
ABI tag), so exactly these modules are loaded from the system directory, without
putting the rest of the system's packages on ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

SYSTEM_DIRS = (
    "/usr/lib/python3/dist-packages",  # Debian, Ubuntu
    f"/usr/lib64/python3.{sys.version_info.minor}/site-packages",  # Fedora, RHEL, SUSE
    f"/usr/lib/python3.{sys.version_info.minor}/site-packages",  # Arch, Alpine
)

NBD_MISSING = (
    "libnbd Python bindings for Python {ver} are not installed: "
    "Debian/Ubuntu `apt-get install python3-libnbd`, Fedora/RHEL `dnf install python3-libnbd`"
)

LIBVIRT_MISSING = (
    "libvirt Python bindings for Python {ver} are not installed: "
    "Debian/Ubuntu `apt-get install python3-libvirt`, Fedora/RHEL `dnf install python3-libvirt`"
)


class BindingsMissing(ImportError):
    """The bindings are not installed for this Python (the message names the package)."""


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


def find_system_module(
    py_name: str, c_name: str, dirs: tuple[str, ...] | None = None
) -> tuple[Path, Path] | None:
    """The system's ``py_name.py`` and a ``c_name`` C module this interpreter can load (``dirs``:
    default ``SYSTEM_DIRS``, read at call time so that tests can point it elsewhere)."""
    for d in map(Path, SYSTEM_DIRS if dirs is None else dirs):
        py = d / f"{py_name}.py"
        if not py.is_file():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            so = d / f"{c_name}{suffix}"
            if so.is_file():
                return py, so
    return None


_loading = threading.Lock()  # see load_system_module


def load_system_module(
    py_name: str, c_name: str, missing: str, *, label: str = "", dirs: tuple[str, ...] | None = None
) -> ModuleType:
    """Import ``py_name`` from this interpreter's path, else from the system's directories.

    Raises:
        BindingsMissing: not found, or not loadable by this Python; ``missing`` (formatted with
            ``{ver}``, this Python's version) says which package to install.
    """
    with _loading:  # a module loaded by hand (``_load``) is in sys.modules before it is whole
        return _load_system_module(py_name, c_name, missing, label, dirs)


def _load_system_module(
    py_name: str, c_name: str, missing: str, label: str, dirs: tuple[str, ...] | None
) -> ModuleType:
    try:
        return importlib.import_module(py_name)
    except ImportError:
        pass
    found = find_system_module(py_name, c_name, dirs)
    if found is None:
        raise BindingsMissing(missing.format(ver=sysconfig.get_python_version()))
    py, so = found
    try:
        _load(c_name, so)
        return _load(py_name, py)
    except ImportError as e:
        raise BindingsMissing(f"{so}: cannot load the {label or py_name} bindings: {e}") from e


def load_nbd() -> ModuleType:
    """libnbd's ``nbd`` module (Debian's python3-libnbd)."""
    return load_system_module("nbd", "libnbdmod", NBD_MISSING)


def load_libvirt() -> ModuleType:
    """libvirt's ``libvirt`` module (Debian's python3-libvirt)."""
    return load_system_module("libvirt", "libvirtmod", LIBVIRT_MISSING)


def load_libvirt_qemu() -> ModuleType:
    """libvirt's ``libvirt_qemu`` module (QEMU-only calls: the guest agent, the monitor), same package.

    It imports ``libvirt`` itself, so that one is loaded first.
    """
    load_libvirt()
    return load_system_module("libvirt_qemu", "libvirtmod_qemu", LIBVIRT_MISSING)
