"""Each loader's entries / default_entry / set_default on a FakeGuest holding the configs of tests/data.

The text helpers are pinned in tests/rekernel/test_loaders.py; here the handlers read and write the
guest as they do at apply and verify time (GRUB 2 through grub-editenv or a grubenv written directly,
extlinux's DEFAULT, menu.lst's ``default``), for a guest with /boot on the root and a separate one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vimgtools.boot import Extlinux, Grub2, GrubLegacy, detect
from vimgtools.boot.extlinux import add_label
from vimgtools.boot.grub2 import parse_grubenv
from vimgtools.boot.grub_legacy import add_title
from vimgtools.errors import BootloaderError
from vimgtools.guest.facts import GuestFacts, collect_facts
from vimgtools.guest.fake import FakeGuest

DATA = Path(__file__).resolve().parents[1] / "data"
OLD = "6.1.0-50-amd64"
NEW = "6.1.0-56-cloud-amd64"
UUID = "a3ba2f22-5319-4647-a3b9-f410b123c3e8"


def guest(files: dict[str, str], tools: tuple[str, ...] = (), *, separate_boot: bool = False) -> FakeGuest:
    mps = {"/": "/dev/sda2", "/boot": "/dev/sda1"} if separate_boot else {"/": "/dev/sda1"}
    g = FakeGuest(roots=[mps["/"]], mountpoints=mps)
    for path, text in files.items():
        g.put(path, text)
    for t in tools:
        g.put(t, "")
    g.mkdir_p("/boot")
    return g


def facts_of(g: FakeGuest) -> GuestFacts:
    return collect_facts(g, g.roots()[0])


# -- GRUB 2 ---------------------------------------------------------------------------------------
def test_grub2_default_entry_and_set_default_with_grub_editenv() -> None:
    g = guest(
        {"/boot/grub/grub.cfg": (DATA / "grub2-debian12.cfg").read_text()},
        ("/usr/sbin/update-grub", "/usr/bin/grub-editenv"),
    )
    f = facts_of(g)
    loader = detect(f)
    assert isinstance(loader, Grub2)
    # No grubenv: saved_entry is empty, GRUB boots entry 0 (the highest version, NEW here).
    e = loader.default_entry(g, f)
    assert (e.kernel, e.initrd) == (f"/boot/vmlinuz-{NEW}", f"/boot/initrd.img-{NEW}")
    assert e.title == "Debian GNU/Linux"
    loader.set_default(g, f, OLD)
    selector = f"gnulinux-advanced-{UUID}>gnulinux-{OLD}-advanced-{UUID}"
    assert g.commands == [("/usr/bin/grub-editenv", "/boot/grub/grubenv", "set", f"saved_entry={selector}")]
    assert g.text("/boot/grub/grubenv") is None, "grub-editenv wrote it, not the handler"
    kernels = [x.kernel for x in loader.entries(g, f)]
    assert kernels.count(f"/boot/vmlinuz-{OLD}") == 2  # normal and recovery
    with pytest.raises(BootloaderError, match="no grub2 entry boots kernel 9\\.9"):
        loader.set_default(g, f, "9.9")


def test_grub2_set_default_writes_grubenv_without_grub_editenv() -> None:
    g = guest({"/boot/grub/grub.cfg": (DATA / "grub2-debian12.cfg").read_text()}, ("/usr/sbin/update-grub",))
    f = facts_of(g)
    loader = detect(f)
    loader.set_default(g, f, OLD)
    env = g.text("/boot/grub/grubenv") or ""
    assert len(env) == 1024 and parse_grubenv(env)["saved_entry"].endswith(f"gnulinux-{OLD}-advanced-{UUID}")
    e = loader.default_entry(g, f)
    assert e.kernel == f"/boot/vmlinuz-{OLD}" and "recovery" not in e.title
    assert g.commands == []
    loader.set_default(g, f, NEW)
    assert loader.default_entry(g, f).kernel == f"/boot/vmlinuz-{NEW}"


def test_grub2_separate_boot_paths_and_a_default_that_selects_nothing() -> None:
    g = guest(
        {
            "/boot/grub/grub.cfg": (DATA / "grub2-sepboot.cfg").read_text(),
            "/boot/grub/grubenv": "# GRUB Environment Block\nsaved_entry=no-such-entry\n",
        },
        ("/usr/sbin/update-grub",),
        separate_boot=True,
    )
    f = facts_of(g)
    loader = detect(f)
    assert all(e.kernel.startswith("/boot/vmlinuz-") for e in loader.entries(g, f)), (
        "guest paths, not /vmlinuz"
    )
    with pytest.raises(BootloaderError, match="the default 'no-such-entry' selects no entry"):
        loader.default_entry(g, f)
    loader.set_default(g, f, OLD)
    e = loader.default_entry(g, f)
    assert (e.kernel, e.initrd) == (f"/boot/vmlinuz-{OLD}", f"/boot/initrd.img-{OLD}")


# -- extlinux -------------------------------------------------------------------------------------
def test_extlinux_default_entry_and_set_default() -> None:
    conf = "/boot/extlinux/extlinux.conf"
    g = guest({conf: add_label((DATA / "extlinux-debian.conf").read_text(), NEW)}, ("/usr/bin/extlinux",))
    f = facts_of(g)
    loader = detect(f)
    assert isinstance(loader, Extlinux)
    e = loader.default_entry(g, f)
    assert (e.ident, e.kernel, e.initrd) == (f"vimg-{NEW}", f"/boot/vmlinuz-{NEW}", f"/boot/initrd.img-{NEW}")
    loader.set_default(g, f, OLD)
    assert "DEFAULT debian" in (g.text(conf) or "").splitlines()
    assert loader.default_entry(g, f).kernel == f"/boot/vmlinuz-{OLD}"
    assert [x.ident for x in loader.entries(g, f)] == [f"vimg-{NEW}", "debian", "debian-recovery"]
    with pytest.raises(BootloaderError, match="no extlinux entry boots kernel 9\\.9"):
        loader.set_default(g, f, "9.9")
    g.write(conf, (g.text(conf) or "").replace("DEFAULT debian", "DEFAULT gone"))
    with pytest.raises(BootloaderError, match="DEFAULT 'gone' names no LABEL"):
        loader.default_entry(g, f)


def test_syslinux_separate_boot_relative_paths_and_no_default() -> None:
    conf = "/boot/syslinux/syslinux.cfg"
    text = (DATA / "syslinux-sepboot.cfg").read_text()
    g = guest({conf: text}, ("/usr/bin/extlinux",), separate_boot=True)
    f = facts_of(g)
    loader = detect(f)
    e = loader.default_entry(g, f)
    assert (e.kernel, e.initrd) == ("/boot/vmlinuz-5.10.0-9-amd64", "/boot/initrd.img-5.10.0-9-amd64")
    g.write(conf, text.replace("default linux\n", "").replace("/vmlinuz", "vmlinuz"))
    e = loader.default_entry(g, f)
    assert e.ident == "linux", "no DEFAULT: the first label"
    assert e.kernel == "/boot/syslinux/vmlinuz-5.10.0-9-amd64", "relative to the configuration's directory"


# -- GRUB legacy ----------------------------------------------------------------------------------
def test_grub_legacy_default_entry_and_set_default() -> None:
    conf = "/boot/grub/menu.lst"
    g = guest({conf: add_title((DATA / "menu.lst").read_text(), NEW)})
    f = facts_of(g)
    loader = detect(f)
    assert isinstance(loader, GrubLegacy)
    e = loader.default_entry(g, f)
    assert (e.ident, e.kernel) == ("0", f"/boot/vmlinuz-{NEW}")
    loader.set_default(g, f, "2.6.32-5-amd64")
    assert "default 1" in (g.text(conf) or "").splitlines()
    e = loader.default_entry(g, f)
    assert e.kernel == "/boot/vmlinuz-2.6.32-5-amd64" and "single" not in e.title
    with pytest.raises(BootloaderError, match="no grub-legacy entry boots kernel 9\\.9"):
        loader.set_default(g, f, "9.9")
    g.write(conf, (g.text(conf) or "").replace("default 1", "default 7"))
    with pytest.raises(BootloaderError, match="default 7 but only 3 entries"):
        loader.default_entry(g, f)


def test_grub_legacy_separate_boot_paths() -> None:
    text = (
        (DATA / "menu.lst")
        .read_text()
        .replace("/boot/vmlinuz", "/vmlinuz")
        .replace("/boot/initrd", "/initrd")
    )
    g = guest({"/boot/grub/menu.lst": text}, separate_boot=True)
    f = facts_of(g)
    e = detect(f).default_entry(g, f)
    assert (e.kernel, e.initrd) == ("/boot/vmlinuz-2.6.32-5-amd64", "/boot/initrd.img-2.6.32-5-amd64")
