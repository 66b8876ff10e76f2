"""Finding libguestfs's Python bindings from the venv (no appliance is launched here)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from vimgtools.errors import GuestError, VimgError
from vimgtools.guest import bindings

IN_VENV = sys.prefix != sys.base_prefix


def test_load_guestfs_then_plain_import_works() -> None:
    """In a fresh interpreter: the loader finds the system's bindings; then ``import guestfs`` works."""
    code = textwrap.dedent(
        """
        import importlib.util
        before = importlib.util.find_spec("guestfs") is not None
        from vimgtools.guest.bindings import load_guestfs
        g = load_guestfs()
        import guestfs
        print(before, g is guestfs, hasattr(guestfs, "GuestFS"), guestfs.__file__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, same, has_class, path = out.stdout.split()
    if IN_VENV:  # the project's venv has no system site packages: the loader did the work
        assert before == "False"
    assert same == "True"
    assert has_class == "True"
    assert Path(path).parent in map(Path, bindings.SYSTEM_DIRS)


def test_load_guestfs_in_this_process() -> None:
    g = bindings.load_guestfs()
    assert callable(g.GuestFS)
    import guestfs

    assert guestfs is g
    assert bindings.load_guestfs() is g  # a second call returns the same module


class _Hide(importlib.abc.MetaPathFinder):
    """Makes ``import guestfs`` fail here even where the bindings are on sys.path."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in ("guestfs", "libguestfsmod"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_guestfs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("guestfs", "libguestfsmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Hide(), *sys.meta_path])


def test_missing_bindings_name_the_package(
    no_guestfs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Our message, not libguestfs's: the system directories are an empty tmp dir."""
    monkeypatch.setattr(bindings, "SYSTEM_DIRS", (str(tmp_path),))
    with pytest.raises(GuestError) as e:
        bindings.load_guestfs()
    msg = str(e.value)
    assert "apt-get install python3-guestfs" in msg
    assert "python3-libguestfs" in msg  # Fedora/SUSE name too
    assert f"Python {sysconfig.get_python_version()}" in msg
    assert isinstance(e.value, VimgError)
    assert e.value.exit_code == 1


def test_unloadable_bindings_name_the_file(
    no_guestfs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ``libguestfsmod`` this interpreter cannot load: GuestError naming it, no half-loaded module."""
    (tmp_path / "guestfs.py").write_text("import libguestfsmod\n")
    so = tmp_path / f"libguestfsmod{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    so.write_bytes(b"not an ELF file")
    monkeypatch.setattr(bindings, "SYSTEM_DIRS", ("/nonexistent", str(tmp_path)))
    assert bindings.find_system_bindings() == (tmp_path / "guestfs.py", so)
    with pytest.raises(GuestError, match="cannot load the libguestfs bindings") as e:
        bindings.load_guestfs()
    assert str(so) in str(e.value)
    assert isinstance(e.value.__cause__, ImportError)
    assert "libguestfsmod" not in sys.modules
    assert "guestfs" not in sys.modules


def test_find_system_bindings_needs_both_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bindings, "SYSTEM_DIRS", (str(tmp_path),))
    assert bindings.find_system_bindings() is None
    (tmp_path / "guestfs.py").write_text("")
    assert bindings.find_system_bindings() is None  # the C module is missing
    (tmp_path / "libguestfsmod.cpython-30-x86_64-linux-gnu.so").write_bytes(b"")
    assert bindings.find_system_bindings() is None  # built for another Python


def test_missing_libnbd_bindings_name_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same mechanism for libnbd (qcow2 and the other formats): the message names python3-libnbd."""
    from vimgtools import bindings as system
    from vimgtools.errors import ImageError
    from vimgtools.nbd import nbd_module

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name in ("nbd", "libnbdmod"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for name in ("nbd", "libnbdmod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Hide(), *sys.meta_path])

    def load() -> object:  # the system directories are an empty tmp dir
        return system.load_system_module("nbd", "libnbdmod", system.NBD_MISSING, dirs=(str(tmp_path),))

    with pytest.raises(system.BindingsMissing, match="apt-get install python3-libnbd"):
        load()
    monkeypatch.setattr("vimgtools.nbd.load_nbd", load)
    with pytest.raises(ImageError, match="python3-libnbd"):
        nbd_module()


def test_threads_loading_the_libnbd_bindings_at_once_get_one_module() -> None:
    """replicate loads libnbd's bindings in a thread while QEMU takes the moment, and the export
    asks for them too: one module, loaded once (without the lock ~3 runs in 10 had two, or failed)."""
    code = (
        "import sys, threading, vimgtools.bindings as b\n"
        "got = []\n"
        "ts = [threading.Thread(target=lambda: got.append(b.load_nbd())) for _ in range(8)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "assert len(got) == 8 and all(m is sys.modules['nbd'] for m in got), got\n"
    )
    for _ in range(5):  # a race: five fresh processes
        subprocess.run([sys.executable, "-c", code], check=True)
