"""Finding libvirt's Python bindings (Debian's python3-libvirt) from the venv; no daemon is contacted."""

from __future__ import annotations

import importlib.abc
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from vimgtools import bindings

IN_VENV = sys.prefix != sys.base_prefix
NAMES = ("libvirt", "libvirtmod", "libvirt_qemu", "libvirtmod_qemu")


def test_load_libvirt_then_plain_import_works() -> None:
    """In a fresh interpreter: both loaders find the system's modules; then plain imports work."""
    code = textwrap.dedent(
        """
        import importlib.util
        before = importlib.util.find_spec("libvirt") is not None
        from vimgtools.bindings import load_libvirt, load_libvirt_qemu
        lv = load_libvirt()
        qemu = load_libvirt_qemu()
        import libvirt, libvirt_qemu
        print(before, lv is libvirt, qemu is libvirt_qemu, callable(libvirt.open),
              callable(libvirt_qemu.qemuAgentCommand), libvirt.__file__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, same, same_qemu, has_open, has_agent, path = out.stdout.split()
    if IN_VENV:  # the project's venv has no system site packages: the loader did the work
        assert before == "False"
    assert (same, same_qemu, has_open, has_agent) == ("True",) * 4
    assert Path(path).parent in map(Path, bindings.SYSTEM_DIRS)


class _Hide(importlib.abc.MetaPathFinder):
    """Makes ``import libvirt`` (and its C module) fail here even where they are on sys.path."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in NAMES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_libvirt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No libvirt anywhere: hidden from imports, and the system directories an empty tmp dir."""
    for name in NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Hide(), *sys.meta_path])
    monkeypatch.setattr(bindings, "SYSTEM_DIRS", (str(tmp_path),))


@pytest.mark.parametrize("load", [bindings.load_libvirt, bindings.load_libvirt_qemu])
def test_missing_libvirt_bindings_name_the_package(no_libvirt: None, load: object) -> None:
    assert callable(load)
    with pytest.raises(bindings.BindingsMissing) as e:
        load()
    msg = str(e.value)
    assert "apt-get install python3-libvirt" in msg
    assert "dnf install python3-libvirt" in msg
    assert f"Python {sysconfig.get_python_version()}" in msg
    assert isinstance(e.value, ImportError)
    assert not any(name in sys.modules for name in NAMES)


def test_unloadable_libvirt_names_the_file(
    no_libvirt: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ``libvirtmod`` this interpreter cannot load: the error names it, nothing half-loaded stays."""
    import importlib.machinery

    (tmp_path / "libvirt.py").write_text("import libvirtmod\n")
    so = tmp_path / f"libvirtmod{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    so.write_bytes(b"not an ELF file")
    with pytest.raises(bindings.BindingsMissing, match="cannot load the libvirt bindings") as e:
        bindings.load_libvirt()
    assert str(so) in str(e.value)
    assert "libvirtmod" not in sys.modules
    assert "libvirt" not in sys.modules
