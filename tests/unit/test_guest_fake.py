"""FakeGuest behaves as libguestfs does where rekernel relies on it, and collect_facts reads a guest from it.

Both GuestImage and FakeGuest satisfy the Guest protocol (mypy checks it; here, that neither lacks
a call the protocol names).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vimgtools.errors import GuestError, InvalidInput
from vimgtools.guest.facts import choose_root, collect_facts
from vimgtools.guest.fake import FakeGuest
from vimgtools.guest.protocol import Guest
from vimgtools.guest.session import GuestImage

GRUB_MBR = b"\xeb\x63\x90" + b"GRUB " + bytes(502) + b"\x55\xaa"


def protocol_calls() -> set[str]:
    return {n for n in vars(Guest) if not n.startswith("_")} | set(Guest.__annotations__)


@pytest.mark.parametrize("cls", [GuestImage, FakeGuest])
def test_both_guests_offer_every_call_of_the_protocol(cls: type) -> None:
    missing = {n for n in protocol_calls() if not hasattr(cls, n) and n not in ("image", "launch_seconds")}
    assert not missing
    if cls is FakeGuest:
        g = FakeGuest()
        assert isinstance(g.image, Path) and g.launch_seconds == 0.0


def test_paths_follow_intermediate_links_and_look_at_the_last_one() -> None:
    g = FakeGuest().put_link("/lib", "usr/lib").put("/usr/lib/modules/1/modules.dep", "x")
    g.put_link("/usr/lib/dangling", "/nowhere")
    assert g.is_file("/lib/modules/1/modules.dep") and g.exists("/lib/modules/1")
    assert g.is_symlink("/lib") and not g.is_dir("/lib") and g.exists("/lib")
    assert g.readlink("/lib") == "usr/lib" and g.readlink("/usr") is None
    assert g.realpath("/lib/modules") == "/usr/lib/modules"
    assert g.is_symlink("/lib/dangling") and not g.exists("/lib/dangling")
    with pytest.raises(GuestError, match="No such file"):
        g.realpath("/lib/dangling")
    assert g.ls("/lib") == ["dangling", "modules"]
    assert g.text("/lib/modules/1/modules.dep") == "x" and g.text("/nope") is None
    g.put_link("/loop", "/loop")
    with pytest.raises(GuestError, match="too many levels"):
        g.exists("/loop/x")


def test_ln_s_onto_a_directory_lands_inside_it() -> None:
    """The trap of ln -sf /boot/modules /lib/modules (FIELD-NOTES): rekernel removes, then links."""
    g = FakeGuest()
    g.mkdir_p("/usr/lib/modules")
    g.ln_s("/boot/modules", "/usr/lib/modules")
    assert g.readlink("/usr/lib/modules/modules") == "/boot/modules"
    with pytest.raises(GuestError, match="File exists"):
        g.ln_s("/boot/modules", "/usr/lib/modules/modules")


def test_mv_rmdir_rm_and_their_refusals() -> None:
    g = FakeGuest().put("/a/b/c", "1").put_link("/a/l", "b")
    g.mkdir_p("/d")
    g.mv("/a/b", "/d/b2")
    assert g.text("/d/b2/c") == "1" and not g.exists("/a/b")
    g.mv("/a/l", "/d")  # into an existing directory, the link itself
    assert g.readlink("/d/l") == "b"
    with pytest.raises(GuestError, match="not empty"):
        g.rmdir("/d")
    with pytest.raises(GuestError, match="No such file"):
        g.mv("/missing", "/x")
    with pytest.raises(GuestError, match="No such file or directory"):
        g.write("/no/dir/f", "x")
    with pytest.raises(GuestError, match="Is a directory"):
        g.rm_f("/d")
    g.rm_f("/d/none")  # missing is fine for rm -f
    g.rm_rf("/d")
    assert not g.exists("/d") and g.ls("/") == ["a"]
    g.rmdir("/a")
    with pytest.raises(GuestError, match="absolute"):
        g.exists("relative")


def test_tar_in_keeps_links_and_run_records(tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in (("./kernel/a.ko", b"ko"), ("./modules.dep", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./build")
        link.type, link.linkname = tarfile.SYMTYPE, "/usr/src/x"
        t.addfile(link)
    g = FakeGuest()
    g.mkdir_p("/boot/modules/1")
    g.tar_in(str(tar), "/boot/modules/1")
    assert (
        g.files["/boot/modules/1/kernel/a.ko"] == b"ko"
        and g.readlink("/boot/modules/1/build") == "/usr/src/x"
    )
    g.handlers["echo"] = lambda g, argv: " ".join(argv[1:])
    assert g.run(["/bin/echo", "hi"]) == "hi" and g.run(("true",)) == ""
    g.failing.add("false")
    with pytest.raises(GuestError, match="false failed"):
        g.run(["/bin/false"])
    assert g.commands == [("/bin/echo", "hi"), ("true",), ("/bin/false",)]
    out = tmp_path / "dl"
    g.download("/boot/modules/1/kernel/a.ko", str(out))
    assert out.read_bytes() == b"ko" and g.pread("/boot/modules/1/kernel/a.ko", 1, 1) == b"o"


def test_choose_root() -> None:
    g = FakeGuest(roots=["/dev/sda2", "btrfsvol:/dev/sda2/@/.snapshots/1/snapshot"])
    assert choose_root(g, None) == "/dev/sda2", "snapper snapshots are never a target"
    with pytest.raises(InvalidInput, match="a read-only snapshot"):
        choose_root(g, "btrfsvol:/dev/sda2/@/.snapshots/1/snapshot")
    with pytest.raises(InvalidInput, match="no root /dev/sdb1"):
        choose_root(g, "/dev/sdb1")
    with pytest.raises(InvalidInput, match="several systems"):
        choose_root(FakeGuest(roots=["/dev/sda1", "/dev/sdb1"]), None)
    with pytest.raises(InvalidInput, match="no operating system"):
        choose_root(FakeGuest(roots=[], mountpoints={"/": "/dev/sda1"}), None)


def usrmerged(**kw: object) -> FakeGuest:
    g = FakeGuest(devices={"/dev/sda": GRUB_MBR}, **kw)  # type: ignore[arg-type]
    g.put_link("/lib", "usr/lib")
    g.put("/usr/lib/modules/6.1.0-50-amd64/kernel/a.ko", bytes(4096))
    g.put("/usr/lib/modules/6.1.0-50-amd64/modules.dep", b"")
    g.put("/usr/lib/modules/stray-file", b"")
    g.put("/boot/vmlinuz-6.1.0-50-amd64", b"k")
    g.put("/boot/initrd.img-6.1.0-50-amd64", b"i")
    g.put_link("/boot/vmlinuz", "vmlinuz-6.1.0-50-amd64")
    g.put("/boot/grub/grub.cfg", "menuentry 'x' {\n}\n")
    g.put("/etc/selinux/config", "# c\nSELINUX=Enforcing\n")
    g.put("/usr/sbin/update-grub", "")
    g.put("/boot/vimgtools/rekernel.json", "{}")
    return g


def test_collect_facts_usrmerged_guest() -> None:
    g = usrmerged(boot_free=300 << 20)
    f = collect_facts(g, "/dev/sda1")
    assert (f.root, f.arch, f.distro) == ("/dev/sda1", "x86_64", "debian")
    assert f.lib_is_link and f.modules_path == "/usr/lib/modules" and not f.modules_on_boot
    assert f.module_versions == {"6.1.0-50-amd64": 4096}, "directories only, du in bytes"
    assert f.boot_kernels == ["6.1.0-50-amd64"], "the vmlinuz link is not a kernel"
    assert f.boot_free == 300 << 20 and not f.boot_separate
    assert f.fs_types == {"/": "ext4"} and f.boot_code == "grub"
    assert f.selinux == "enforcing"
    assert "/boot/grub/grub.cfg" in f.files and "/boot/vimgtools/rekernel.json" not in f.files
    assert f.tools == {"/usr/sbin/update-grub"}
    assert (
        collect_facts(g, "/dev/sda1", extra_files=["/boot/vimgtools/rekernel.json"]).text(
            "/boot/vimgtools/rekernel.json"
        )
        == "{}"
    )


def test_collect_facts_convention_followed_and_separate_boot() -> None:
    g = FakeGuest(
        roots=["/dev/sda2"],
        mountpoints={"/": "/dev/sda2", "/boot": "/dev/sda1"},
        filesystems={"/dev/sda1": "ext2"},
        devices={"/dev/sda": GRUB_MBR},
    )
    g.put_link("/lib", "usr/lib")
    g.put("/boot/modules/6.1.0-50-amd64/modules.dep", b"")
    g.put_link("/usr/lib/modules", "/boot/modules")
    f = collect_facts(g, "/dev/sda2")
    assert f.modules_on_boot and f.modules_path == "/boot/modules"
    assert f.boot_separate and f.fs_types == {"/": "ext4", "/boot": "ext2"}
    assert f.boot_code == "grub", "sector 0 of the disk holding /boot"
    assert f.boot_kernels == [] and f.selinux == "disabled"


def test_collect_facts_partitionless_disk_has_no_mbr_code() -> None:
    g = FakeGuest(roots=["/dev/sda"])
    g.mkdir_p("/boot")
    f = collect_facts(g, "/dev/sda")
    assert f.mountpoints == {"/": "/dev/sda"} and f.boot_code is None
    assert f.modules_path == "/usr/lib/modules" and f.module_versions == {}
