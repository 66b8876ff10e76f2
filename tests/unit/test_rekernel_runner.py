"""The rekernel middle on a FakeGuest: the runner (each step kind, stop at the first failure), verify
(pass and each failure), the session's lifecycle (commit, dry run, throw away), rekernel() and
rollback() end to end in memory, and ``--dry-run --rollback`` from the CLI. No appliance: seconds.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any

import pytest
from kernelhelp import bzimage

import vimgtools.rekernel.session as session_mod
from vimgtools.boot import Grub2, detect
from vimgtools.boot.grub2 import make_grubenv, parse_grubenv
from vimgtools.errors import GuestError, InvalidInput, KernelError, VimgError
from vimgtools.guest.facts import collect_facts
from vimgtools.guest.fake import FakeGuest
from vimgtools.guest.steps import (
    InstallModules,
    Mkdir,
    Move,
    RemoveDir,
    RunCommand,
    SetDefault,
    Symlink,
    Upload,
    Write,
)
from vimgtools.kernel import find_kernel
from vimgtools.rekernel import rekernel, rollback
from vimgtools.rekernel.__main__ import main
from vimgtools.rekernel.apply import apply_plan, run_step, verify
from vimgtools.rekernel.plan import STATE_FILE, Options, Plan, plan_rekernel

DATA = Path(__file__).resolve().parents[1] / "data"
OLD = "6.1.0-50-amd64"
NEW = "6.1.0-56-cloud-amd64"
UUID = "a3ba2f22-5319-4647-a3b9-f410b123c3e8"
GRUB_MBR = b"\xeb\x63\x90" + b"GRUB " + bytes(502) + b"\x55\xaa"


# -- a Debian 12 guest in memory, with GRUB 2 acted out -------------------------------------------


def grub_cfg(versions: list[str], boot: str = "/boot") -> str:
    """A grub.cfg in the shape Debian 12's grub-mkconfig writes (tests/data/grub2-debian12.cfg)."""
    text = (DATA / "grub2-debian12.cfg").read_text()
    head = text[: text.index("### BEGIN /etc/grub.d/10_linux ###")]
    vs = sorted(versions, reverse=True)

    def entry(title: str, ident: str, v: str, indent: str, extra: str = "") -> str:
        return (
            f"{indent}menuentry '{title}' --class debian $menuentry_id_option '{ident}' {{\n"
            f"{indent}\tlinux\t{boot}/vmlinuz-{v} root=UUID={UUID} ro{extra} quiet\n"
            f"{indent}\tinitrd\t{boot}/initrd.img-{v}\n{indent}}}\n"
        )

    out = [head, "### BEGIN /etc/grub.d/10_linux ###\n"]
    out.append(entry("Debian GNU/Linux", f"gnulinux-simple-{UUID}", vs[0], ""))
    out.append(
        f"submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{UUID}' {{\n"
    )
    for v in vs:
        out.append(entry(f"Debian GNU/Linux, with Linux {v}", f"gnulinux-{v}-advanced-{UUID}", v, "\t"))
        out.append(
            entry(
                f"Debian GNU/Linux, with Linux {v} (recovery mode)",
                f"gnulinux-{v}-recovery-{UUID}",
                v,
                "\t",
                " single",
            )
        )
    out.append("}\n### END /etc/grub.d/10_linux ###\n")
    return "".join(out)


def update_grub(g: FakeGuest, argv: tuple[str, ...]) -> str:
    boot = "" if "/boot" in g.mountpoints else "/boot"
    versions = [n[len("vmlinuz-") :] for n in g.ls("/boot") if n.startswith("vmlinuz-")]
    g.write("/boot/grub/grub.cfg", grub_cfg(versions, boot))
    return ""


def grub_editenv(g: FakeGuest, argv: tuple[str, ...]) -> str:
    _tool, envfile, op, *assignments = argv
    assert op == "set"
    env = parse_grubenv(g.text(envfile) or "")
    env.update(a.split("=", 1) for a in assignments)  # type: ignore[misc]
    g.write(envfile, make_grubenv(env))
    return ""


def debian_guest(*, separate_boot: bool = False) -> FakeGuest:
    """Debian 12, usrmerged, GRUB 2 in the MBR, kernel OLD booted by default."""
    mps = {"/": "/dev/sda2", "/boot": "/dev/sda1"} if separate_boot else {"/": "/dev/sda1"}
    g = FakeGuest(roots=[mps["/"]], mountpoints=mps, devices={"/dev/sda": GRUB_MBR})
    g.put_link("/lib", "usr/lib")
    g.put(f"/usr/lib/modules/{OLD}/modules.dep", "")
    g.put(f"/usr/lib/modules/{OLD}/kernel/drivers/block/virtio_blk.ko", bytes(5000))
    g.put(f"/boot/vmlinuz-{OLD}", bzimage(OLD))
    g.put(f"/boot/initrd.img-{OLD}", b"initrd")
    g.put("/etc/default/grub", (DATA / "default-grub").read_text())
    for tool in ("/usr/sbin/update-grub", "/usr/bin/grub-editenv", "/usr/sbin/update-initramfs"):
        g.put(tool, "#!/bin/sh\n")
    g.handlers["update-grub"] = update_grub
    g.handlers["grub-editenv"] = grub_editenv
    g.mkdir_p("/boot/grub")
    update_grub(g, ("update-grub",))
    return g


def make_bootdir(d: Path, version: str = NEW, *, initramfs: bool = True) -> Path:
    mods = d / "modules" / version / "kernel" / "drivers"
    mods.mkdir(parents=True)
    (d / f"vmlinuz-{version}").write_bytes(bzimage(version))
    (d / f"config-{version}").write_text(
        "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_SCSI_VIRTIO=m\nCONFIG_EXT4_FS=y\n"
    )
    (mods / "virtio_blk.ko").write_bytes(bytes(100))
    (mods / "virtio_scsi.ko").write_bytes(bytes(100))
    (d / "modules" / version / "build").symlink_to("/usr/src/linux-headers-x")
    if initramfs:
        (d / f"initrd.img-{version}").write_bytes(b"initrd")
    return d


INITRD_FILES = ["usr/lib/modules/x/virtio_blk.ko", "usr/lib/modules/x/virtio_scsi.ko.zst"]


def planned(g: FakeGuest, bootdir: Path, **options: Any) -> Plan:
    g.mount_root(g.roots()[0])
    facts = collect_facts(g, g.roots()[0], extra_files=(STATE_FILE,))
    return plan_rekernel(
        facts,
        find_kernel(bootdir),
        detect(facts),
        disk="d.img",
        previous=OLD,
        options=Options(**options),
        initrd_files=INITRD_FILES,
    )


def rekernelled(tmp_path: Path) -> tuple[FakeGuest, Plan]:
    g = debian_guest()
    plan = planned(g, make_bootdir(tmp_path / "boot"))
    facts = collect_facts(g, g.roots()[0])
    apply_plan(g, facts, detect(facts), plan)
    return g, plan


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- the runner, step by step ---------------------------------------------------------------------
def test_each_step_kind(tmp_path: Path) -> None:
    g = debian_guest()
    facts = collect_facts(g, "/dev/sda1")
    loader = detect(facts)
    host = tmp_path / "f"
    host.write_bytes(b"kernel bytes")
    run_step(g, facts, loader, Mkdir("/boot/modules"))
    assert g.is_dir("/boot/modules")
    run_step(g, facts, loader, Upload(str(host), "/boot/vmlinuz-x"))
    assert g.files["/boot/vmlinuz-x"] == b"kernel bytes"
    run_step(g, facts, loader, Move(f"/usr/lib/modules/{OLD}", f"/boot/modules/{OLD}"))
    assert g.is_file(f"/boot/modules/{OLD}/modules.dep") and not g.exists(f"/lib/modules/{OLD}")
    run_step(g, facts, loader, RemoveDir("/usr/lib/modules"))
    run_step(g, facts, loader, Symlink("/boot/modules", "/usr/lib/modules"))
    assert g.readlink("/lib/modules") == "/boot/modules"
    assert g.realpath(f"/lib/modules/{OLD}") == f"/boot/modules/{OLD}"
    run_step(g, facts, loader, Symlink("/boot/modules", "/usr/lib/modules"))  # again: replaced, not nested
    assert not g.exists("/boot/modules/modules")
    mods = make_bootdir(tmp_path / "b") / "modules" / NEW
    run_step(g, facts, loader, InstallModules(str(mods), f"/boot/modules/{NEW}", NEW))
    assert g.is_file(f"/lib/modules/{NEW}/modules.dep"), "depmod -b ran on the host"
    assert g.readlink(f"/boot/modules/{NEW}/build") == "/usr/src/linux-headers-x", "links stay links"
    run_step(g, facts, loader, Write("/etc/x.conf", "a\n", None, 0o600))
    assert g.text("/etc/x.conf") == "a\n" and g.modes["/etc/x.conf"] == 0o600
    run_step(g, facts, loader, RunCommand(("/usr/sbin/update-grub",), "why"))
    assert g.commands[-1] == ("/usr/sbin/update-grub",)
    run_step(g, facts, loader, SetDefault("grub2", OLD))
    assert g.commands[-1] == (
        "/usr/bin/grub-editenv",
        "/boot/grub/grubenv",
        "set",
        f"saved_entry=gnulinux-advanced-{UUID}>gnulinux-{OLD}-advanced-{UUID}",
    )

    class Strange:
        def describe(self) -> str:
            return "strange"

    with pytest.raises(TypeError, match="unknown step"):
        run_step(g, facts, loader, Strange())  # type: ignore[arg-type]


def test_symlink_refuses_a_directory_still_there() -> None:
    g = debian_guest()
    facts = collect_facts(g, "/dev/sda1")
    g.mkdir_p("/boot/modules")
    with pytest.raises(GuestError, match="a directory is still there"):
        run_step(g, facts, detect(facts), Symlink("/boot/modules", "/usr/lib/modules"))
    assert not g.exists("/usr/lib/modules/modules"), "never ln -s onto a directory"


def test_symlink_checks_where_the_link_points() -> None:
    g = debian_guest()
    facts = collect_facts(g, "/dev/sda1")

    class Crooked(FakeGuest):
        def ln_s(self, target: str, link: str) -> None:
            super().ln_s("/elsewhere", link)

    c = Crooked()
    c.mkdir_p("/usr/lib")
    with pytest.raises(GuestError, match="points to '/elsewhere', not /boot/modules"):
        run_step(c, facts, detect(facts), Symlink("/boot/modules", "/usr/lib/modules"))


def test_apply_stops_at_the_first_failure_and_keeps_what_was_done(tmp_path: Path) -> None:
    g = debian_guest()
    plan = planned(g, make_bootdir(tmp_path / "boot"))
    g.failing.add("update-grub")
    facts = collect_facts(g, "/dev/sda1")
    done: list[dict[str, Any]] = []
    calls: list[int] = []
    with pytest.raises(GuestError, match="update-grub failed"):
        apply_plan(g, facts, detect(facts), plan, lambda i, n, what: calls.append(i), done=done)
    i_fail = next(
        i for i, s in enumerate(plan.steps) if isinstance(s, RunCommand) and "update-grub" in s.argv[0]
    )
    assert len(done) == i_fail, "every step before the failing one, none after"
    assert calls == list(range(1, i_fail + 2))
    assert not any(c[0].endswith("grub-editenv") for c in g.commands), "SetDefault never ran"
    assert g.text(STATE_FILE) is None


def test_apply_runs_the_whole_plan_in_order(tmp_path: Path) -> None:
    g, _plan = rekernelled(tmp_path)
    assert [c[0] for c in g.commands] == ["/usr/sbin/update-grub", "/usr/bin/grub-editenv"]
    assert g.readlink("/usr/lib/modules") == "/boot/modules"
    assert json.loads(g.text(STATE_FILE) or "") == {
        "loader": "grub2",
        "previous": OLD,
        "tool": "vimgtools.rekernel",
        "version": NEW,
    }
    assert "GRUB_DEFAULT=saved" in (g.text("/etc/default/grub") or "")


# -- verify ---------------------------------------------------------------------------------------
def test_verify_passes_on_a_rekernelled_guest(tmp_path: Path) -> None:
    g, plan = rekernelled(tmp_path)
    facts = collect_facts(g, "/dev/sda1")
    before = g.remounts
    out = verify(g, facts, detect(facts), plan)
    assert g.remounts == before + 1, "verify re-reads the disk"
    assert out["kernel"] == f"/boot/vmlinuz-{NEW}" and out["initramfs"] == f"/boot/initrd.img-{NEW}"
    assert out["modules"] == f"/boot/modules/{NEW}"
    assert out["default_entry"]["kernel"] == f"/boot/vmlinuz-{NEW}"
    assert out["fallback_entry"] == f"Debian GNU/Linux, with Linux {OLD}"


def _break_cfg(g: FakeGuest, old: str, new: str) -> None:
    g.write("/boot/grub/grub.cfg", (g.text("/boot/grub/grub.cfg") or "").replace(old, new))


BREAKAGES = {
    "is missing": lambda g: g.rm(f"/boot/vmlinuz-{NEW}"),
    f"says {OLD}": lambda g: g.write(f"/boot/vmlinuz-{NEW}", bzimage(OLD)),
    "no initramfs": lambda g: g.rm(f"/boot/initrd.img-{NEW}"),
    "resolves to /usr/lib/old": lambda g: (
        g.rm("/usr/lib/modules"),
        g.mkdir_p("/usr/lib/old"),
        g.ln_s("/usr/lib/old", "/usr/lib/modules"),
    ),
    "modules.dep does not resolve": lambda g: g.rm(f"/boot/modules/{NEW}/modules.dep"),
    "stray /lib/modules/modules": lambda g: g.ln_s("/boot/modules", "/boot/modules/modules"),
    f"boots /boot/vmlinuz-{OLD}": lambda g: g.write(
        "/boot/grub/grubenv",
        make_grubenv({"saved_entry": f"gnulinux-advanced-{UUID}>gnulinux-{OLD}-advanced-{UUID}"}),
    ),
    "kernel /boot/x/vmlinuz": lambda g: _break_cfg(g, f"/boot/vmlinuz-{NEW}", f"/boot/x/vmlinuz-{NEW}"),
    "initramfs /boot/none": lambda g: _break_cfg(g, f"/boot/initrd.img-{NEW}", "/boot/none"),
}


@pytest.mark.parametrize("what", list(BREAKAGES))
def test_verify_fails_on_each_breakage(tmp_path: Path, what: str) -> None:
    g, plan = rekernelled(tmp_path)
    facts = collect_facts(g, "/dev/sda1")
    BREAKAGES[what](g)
    with pytest.raises(GuestError, match=f"verify: .*{what}"):
        verify(g, facts, detect(facts), plan)


def test_verify_warns_when_the_old_kernel_lost_its_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g, plan = rekernelled(tmp_path)
    facts = collect_facts(g, "/dev/sda1")
    g.write("/boot/grub/grub.cfg", grub_cfg([NEW]))
    assert verify(g, facts, detect(facts), plan)["fallback_entry"] is None
    assert "no boot entry is left for the previous kernel" in caplog.text


def test_verify_checks_the_regenerated_initramfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drivers the plan says the initramfs needs (modules, not built in), read on the host."""
    import vimgtools.rekernel.apply as apply_mod

    g = debian_guest()
    boot = make_bootdir(tmp_path / "boot", initramfs=False)
    plan = planned(g, boot)
    assert plan.initramfs == "regenerate:update-initramfs"
    assert plan.initramfs_modules == ("virtio_blk", "virtio_scsi")  # virtio_pci and ext4 are built in
    g.handlers["update-initramfs"] = lambda g, argv: g.write(f"/boot/initrd.img-{argv[-1]}", b"cpio") or ""
    facts = collect_facts(g, "/dev/sda1")
    apply_plan(g, facts, detect(facts), plan)
    assert (g.commands[0]) == ("/usr/sbin/update-initramfs", "-c", "-k", NEW)
    listed: list[str] = []
    monkeypatch.setattr(apply_mod, "list_initramfs", lambda path: listed)
    with pytest.raises(GuestError, match="lacks virtio_blk, virtio_scsi"):
        verify(g, facts, detect(facts), plan)
    listed[:] = INITRD_FILES
    assert verify(g, facts, detect(facts), plan)["initramfs_files"] == 2


# -- the session, rekernel() and rollback() on a FakeGuest ----------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "vm" / "guest.img"
    d.parent.mkdir()
    d.write_bytes(bytes(range(256)) * 4096)
    return d


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> FakeGuest:
    """The FakeGuest that the next rekernel()/rollback() runs on; the commit is recorded, not done."""
    g = debian_guest()
    commits: list[Path] = []
    monkeypatch.setattr(session_mod, "open_image", lambda overlay: g)
    monkeypatch.setattr("vimgtools.rekernel.list_initramfs", lambda path: INITRD_FILES)
    monkeypatch.setattr(
        session_mod, "commit_overlay", lambda overlay, disk, fmt: commits.append(disk) or 4096
    )
    g.commits = commits  # type: ignore[attr-defined]
    return g


def test_rekernel_commits_after_verify(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    before = sha256(disk)
    result = rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    assert result.committed and result.bytes_committed == 4096 and guest.commits == [disk]  # type: ignore[attr-defined]
    assert guest.closed is True, "shut down with a flush before the commit"
    assert result.plan is not None and result.plan.previous == OLD and result.plan.version == NEW
    assert [d["step"] for d in result.done] == [s.describe() for s in result.plan.steps]
    assert result.verified["default_entry"]["kernel"] == f"/boot/vmlinuz-{NEW}"
    assert {"launch", "inspect", "apply", "verify", "shutdown", "commit", "total", "work"} <= set(
        result.seconds
    )
    assert sha256(disk) == before, "the commit is the only writer, and it is recorded here"
    assert sorted(p.name for p in disk.parent.iterdir()) == ["guest.img"], "lock and overlay removed"


def test_rekernel_dry_run_commits_nothing(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    result = rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw", dry_run=True)
    assert not result.committed and guest.commits == []  # type: ignore[attr-defined]
    assert guest.closed is True and result.verified


def test_a_failure_throws_the_overlay_away_and_carries_the_result(
    disk: Path, tmp_path: Path, guest: FakeGuest
) -> None:
    guest.failing.add("update-grub")
    with pytest.raises(GuestError) as info:
        rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    assert guest.closed is False, "closed without a flush"
    assert guest.commits == []  # type: ignore[attr-defined]
    partial = info.value.result
    assert partial is not None
    out = partial.to_dict()
    assert out["plan"]["version"] == NEW and not out["committed"]
    assert out["done"] and all("update-grub" not in d["step"] for d in out["done"])
    assert sorted(p.name for p in disk.parent.iterdir()) == ["guest.img"]


def test_preflight_refusal_names_the_class_each_check_refuses_as(
    disk: Path, tmp_path: Path, guest: FakeGuest
) -> None:
    guest.boot_free = 1 << 20
    with pytest.raises(VimgError) as info:
        rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    assert type(info.value).__name__ == "ImageRefused" and info.value.exit_code == 2
    assert "preflight: space: /boot has 1 MiB free" in str(info.value)
    assert info.value.result is not None and info.value.result.to_dict()["done"] == []
    assert guest.closed is False and guest.commands == []


def test_warnings_refuse_unless_forced(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    guest.devices["/dev/sda"] = bytes(512)  # no boot code in sector 0: a warning
    with pytest.raises(VimgError, match=r"boot-code: no boot code .*\(warnings: --force to go on\)") as info:
        rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    assert type(info.value).__name__ == "BootloaderError"
    guest.closed = None
    assert rekernel(disk, make_bootdir(tmp_path / "boot2"), fmt="raw", force=True).committed


def test_replace_is_reported_but_never_refuses(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    guest.put(f"/boot/vmlinuz-{NEW}", bzimage(NEW))
    result = rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    assert result.plan is not None
    (replace,) = [c for c in result.plan.checks if c.name == "replace"]
    assert not replace.ok and replace.refuses_as is None and replace.to_dict()["refuses_as"] is None


def test_kernel_error_before_the_session_has_no_result(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(KernelError) as info:
        rekernel(disk, tmp_path / "empty", fmt="raw")
    assert info.value.result is None
    assert guest.closed is None, "refused before any launch"


def rekernel_then_reopen(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    rekernel(disk, make_bootdir(tmp_path / "boot"), fmt="raw")
    guest.closed = None
    guest.commands.clear()


def test_rollback_makes_the_previous_kernel_the_default(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    rekernel_then_reopen(disk, tmp_path, guest)
    result = rollback(disk, fmt="raw")
    assert result.action == "rollback" and result.committed
    assert result.plan is not None and result.plan.action == "rollback"
    assert (result.plan.previous, result.plan.version) == (NEW, OLD)
    assert [type(s).__name__ for s in result.plan.steps] == ["SetDefault", "Write"]
    assert result.verified["default_entry"]["kernel"] == f"/boot/vmlinuz-{OLD}"
    assert json.loads(guest.text(STATE_FILE) or "")["version"] == OLD
    assert json.loads(guest.text(STATE_FILE) or "")["previous"] == NEW
    # and back again: the state file names the other one now
    guest.closed = None
    assert rollback(disk, fmt="raw").verified["default_entry"]["kernel"] == f"/boot/vmlinuz-{NEW}"


def test_rollback_refusals(disk: Path, tmp_path: Path, guest: FakeGuest) -> None:
    with pytest.raises(InvalidInput, match="not rekernelled by vimgtools") as info:
        rollback(disk, fmt="raw")
    assert info.value.result is not None
    assert guest.closed is False and guest.commands == []
    guest.closed = None
    guest.put(STATE_FILE, json.dumps({"version": NEW, "previous": "5.0.0-gone"}))
    with pytest.raises(InvalidInput, match=r"/boot/vmlinuz-5\.0\.0-gone is gone"):
        rollback(disk, fmt="raw")


def test_cli_dry_run_rollback_prints_the_plan_and_writes_nothing(
    disk: Path, tmp_path: Path, guest: FakeGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    rekernel_then_reopen(disk, tmp_path, guest)
    guest.commits.clear()  # type: ignore[attr-defined]
    before = sha256(disk)
    assert main(["--dry-run", "--rollback", "--format", "raw", str(disk)]) == 0
    out = capsys.readouterr().out
    assert f"rollback {disk} (/dev/sda1): {NEW} -> {OLD}" in out
    assert f"grub2: make {OLD} the default entry" in out
    assert f'- "previous": "{OLD}",' in out and f'+ "previous": "{NEW}",' in out  # the state file's diff
    assert "rehearsed (dry run, DISK unchanged)" in out
    assert guest.commits == []  # type: ignore[attr-defined]
    assert sha256(disk) == before
    assert guest.closed is True
    assert main(["--json", "--dry-run", "--rollback", "--format", "raw", str(disk)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["action"] == "rollback" and obj["dry_run"] and not obj["committed"]
    assert [s["op"] for s in obj["plan"]["steps"]] == ["SetDefault", "Write"]


def test_cli_json_on_refusal_carries_the_plan(
    disk: Path, tmp_path: Path, guest: FakeGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--json", "--rollback", "--format", "raw", str(disk)]) == 2
    captured = capsys.readouterr()
    obj = json.loads(captured.out)
    assert obj["exit_code"] == 2 and not obj["committed"]
    assert obj["plan"]["checks"][0] == {
        "name": "state",
        "ok": False,
        "severity": "error",
        "message": f"no {STATE_FILE}: this guest was not rekernelled by vimgtools",
        "refuses_as": "InvalidInput",
    }
    assert "not rekernelled" in captured.err


def test_the_fake_guest_layout_is_what_collect_facts_expects() -> None:
    g = debian_guest(separate_boot=True)
    facts = collect_facts(g, "/dev/sda2")
    assert facts.boot_separate and facts.boot_code == "grub"
    assert isinstance(detect(facts), Grub2)
    assert posixpath.basename(facts.modules_path) == "modules"
