"""End to end: rekernel real Debian 12 guests with Debian's cloud kernel, then boot them in QEMU (TCG).

Each test copies a cached guest (guestbuild.py), runs the CLI as a user would, and boots the result:
the serial console must show the new kernel running and the ``dummy`` module (=m in the cloud
kernel, loaded by nobody) loading from ``/boot/modules``. Failures and refusals must leave the
disk byte-identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemuboot import boot, copy_image, sha256

from vimgtools.rekernel.__main__ import main
from vimgtools.rekernel.plan import BOOT_MODULES_UNIT_NAME

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

CLI = [sys.executable, "-m", "vimgtools.rekernel"]


def cloud_version(bootdir: Path) -> str:
    (k,) = bootdir.glob("vmlinuz-*")
    return k.name[len("vmlinuz-") :]


def run_cli(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)
    print(f"rekernel {' '.join(args)}: rc={p.returncode} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(p.stderr[-4000:], file=sys.stderr)
    return p


def assert_booted(report: dict[str, str], version: str) -> None:
    assert report["KERNEL"] == version
    assert report["MODULES-LINK"] == "/boot/modules"
    mod = report["MODULE"]
    assert "loaded=yes" in mod, mod
    assert f"file=/boot/modules/{version}/" in mod, mod


@pytest.mark.boot
@pytest.mark.timeout(1800)
def test_grub2_usrmerge_supplied_initramfs_then_rollback(
    grub2_image: Path, cloud_bootdir_initrd: Path, guest_version: str, tmp_path: Path
) -> None:
    disk = copy_image(grub2_image, tmp_path / "grub2.raw")
    new = cloud_version(cloud_bootdir_initrd)
    p = run_cli("--json", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["committed"] and out["bytes_committed"] > 0
    assert out["plan"]["version"] == new and out["plan"]["previous"] == guest_version
    assert out["plan"]["loader"] == "grub2" and out["plan"]["initramfs"] == "supplied"
    assert out["verified"]["default_entry"]["kernel"] == f"/boot/vmlinuz-{new}"
    assert out["verified"]["fallback_entry"], "the old kernel keeps an entry"
    print("timings", out["seconds"], file=sys.stderr)
    report = boot(disk)
    print(f"boot to report: {report.seconds:.0f} s", file=sys.stderr)
    assert_booted(report.values, new)
    assert report["UNLOADED"].split()[0] == "0", report["UNLOADED"]

    # --dry-run --rollback: the rollback plan, rehearsed and verified on the overlay; DISK unchanged.
    before = sha256(disk)
    p = run_cli("--json", "--dry-run", "--rollback", str(disk))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["action"] == "rollback" and out["dry_run"] and not out["committed"]
    assert [s["op"] for s in out["plan"]["steps"]] == ["SetDefault", "Write"]
    assert (out["plan"]["previous"], out["plan"]["version"]) == (new, guest_version)
    assert out["verified"]["default_entry"]["kernel"] == f"/boot/vmlinuz-{guest_version}"
    assert sha256(disk) == before

    p = run_cli("--json", "--rollback", str(disk))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["verified"]["default_entry"]["kernel"] == f"/boot/vmlinuz-{guest_version}"
    report = boot(disk)
    assert report["KERNEL"] == guest_version
    # The old kernel's modules moved to /boot/modules and still load from there.
    assert report["MODULES-LINK"] == "/boot/modules"
    assert f"file=/boot/modules/{guest_version}/" in report["MODULE"]


@pytest.mark.boot
@pytest.mark.timeout(1800)
def test_separate_boot_no_driver_left_unloaded(
    sepboot_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path
) -> None:
    """With /boot separate, /lib/modules is dangling until /boot is mounted; no driver may be missed."""
    disk = copy_image(sepboot_image, tmp_path / "sepboot.raw")
    new = cloud_version(cloud_bootdir_initrd)
    p = run_cli("--json", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["plan"]["facts"]["boot_separate"] is True
    assert out["verified"]["default_entry"]["kernel"] == f"/boot/vmlinuz-{new}"
    report = boot(disk)
    assert_booted(report.values, new)
    assert report["BOOT-MOUNT"] == "/dev/vda1"
    count, *names = report["UNLOADED"].split()
    assert count == "0", f"drivers udev wanted but never loaded: {names}"
    # The trap is real: without the unit rekernel installs, drivers are missed at boot.
    from vimgtools.guest.session import GuestImage

    with GuestImage(disk, write=True) as gi:
        gi.mount_root(gi.roots()[0])
        gi.rm(f"/etc/systemd/system/sysinit.target.wants/{BOOT_MODULES_UNIT_NAME}")
    report = boot(disk)
    assert report["KERNEL"] == new
    count, *names = report["UNLOADED"].split()
    assert int(count) > 0, "without the re-trigger unit some driver should have been missed"
    print("missed without the unit:", names, file=sys.stderr)


@pytest.mark.boot
@pytest.mark.timeout(1200)
def test_partitionless_nord_disk_extlinux(
    nord_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path
) -> None:
    """NORD's layout: the filesystem starts at sector 0 (no partition table), extlinux in its boot sector.

    Through the library this time: ``vimgtools.rekernel(disk, from_dir, **options)`` with a progress callback.
    """
    import vimgtools

    disk = copy_image(nord_image, tmp_path / "nord.raw")
    new = cloud_version(cloud_bootdir_initrd)
    calls: list[tuple[int, int, str]] = []
    result = vimgtools.rekernel(
        disk, cloud_bootdir_initrd, progress=lambda i, n, what: calls.append((i, n, what))
    )
    out = result.to_dict()
    assert out["committed"]
    assert [c[0] for c in calls] == list(range(1, len(out["plan"]["steps"]) + 1))
    assert out["plan"]["facts"]["mountpoints"] == {"/": "/dev/sda"}
    assert out["plan"]["loader"] == "extlinux"
    assert out["plan"]["facts"]["boot_code"] is not None
    report = boot(disk)
    assert_booted(report.values, new)


@pytest.mark.boot
@pytest.mark.timeout(1200)
def test_lvm_root(lvm_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path) -> None:
    """Root on LVM: inspection's mountpoints, the boot sector of the disk under the VG, GRUB on LVM."""
    disk = copy_image(lvm_image, tmp_path / "lvm.raw")
    new = cloud_version(cloud_bootdir_initrd)
    p = run_cli("--json", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["plan"]["facts"]["mountpoints"] == {"/": "/dev/vg0/root"}
    assert out["plan"]["facts"]["boot_code"] == "grub"
    report = boot(disk)
    assert_booted(report.values, new)


def test_failure_in_the_guest_leaves_disk_byte_identical(
    grub2_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """update-grub fails inside the guest after the files were copied: the disk must not change."""
    from vimgtools.guest.session import GuestImage

    disk = copy_image(grub2_image, tmp_path / "broken.raw")
    with GuestImage(disk, write=True) as gi:
        gi.mount_root(gi.roots()[0])
        gi.write("/etc/default/grub", b'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="unterminated\n')
    before = sha256(disk)
    rc = main([str(disk), "--from", str(cloud_bootdir_initrd)])
    assert rc == 1
    assert "update-grub" in capsys.readouterr().err
    assert sha256(disk) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.raw"], "the overlay is removed"


def test_refusals_leave_disk_byte_identical(
    grub2_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = copy_image(grub2_image, tmp_path / "g.raw")
    before = sha256(disk)
    # An initramfs without the virtio drivers: refused in preflight (exit 2), nothing written.
    bad = tmp_path / "bootdir"
    subprocess.run(["cp", "-a", str(cloud_bootdir_initrd), str(bad)], check=True)
    (initrd,) = bad.glob("initrd.img-*")
    tiny = tmp_path / "tiny"
    (tiny / "etc").mkdir(parents=True)
    (tiny / "etc" / "hello").write_text("hi\n")
    cpio = subprocess.run(
        "find . | cpio -o -H newc --quiet | gzip -9", shell=True, cwd=tiny, capture_output=True, check=True
    ).stdout
    initrd.write_bytes(cpio)
    assert main(["--json", str(disk), "--from", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "virtio_blk" in captured.err and "lacks" in captured.err
    out = json.loads(captured.out)  # --json: one object even on failure, with the plan that was refused
    assert out["exit_code"] == 2 and not out["committed"] and out["done"] == []
    failed = {c["name"] for c in out["plan"]["checks"] if not c["ok"]}
    assert {"driver:virtio_blk", "driver:virtio_scsi"} <= failed
    # --dry-run rehearses the whole plan and writes nothing.
    assert main(["--dry-run", str(disk), "--from", str(cloud_bootdir_initrd)]) == 0
    out = capsys.readouterr().out
    assert "GRUB_DEFAULT=saved" in out and "dry run" in out
    assert sha256(disk) == before
    # Modules for another version: refused before any launch.
    wrong = tmp_path / "wrong"
    subprocess.run(["cp", "-a", str(cloud_bootdir_initrd), str(wrong)], check=True)
    (mods,) = (wrong / "modules").iterdir()
    mods.rename(mods.parent / "9.9.9-other")
    assert main([str(disk), "--from", str(wrong)]) == 2
    assert "modules are for 9.9.9-other" in capsys.readouterr().err
    assert sha256(disk) == before
    # --rollback on a guest vimgtools never rekernelled: refused by the rollback plan, dry run or not.
    for dry in ([], ["--dry-run"]):
        assert main(["--json", *dry, "--rollback", str(disk)]) == 2
        captured = capsys.readouterr()
        assert "not rekernelled by vimgtools" in captured.err
        out = json.loads(captured.out)
        assert out["action"] == "rollback" and out["plan"]["steps"] == [] and out["done"] == []
    assert sha256(disk) == before


def test_refuses_an_image_a_running_vm_holds(
    grub2_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path
) -> None:
    disk = copy_image(grub2_image, tmp_path / "busy.raw")
    vm = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",  # paused: holds the image like a running guest, burns no CPU
            "-machine",
            "accel=tcg",
            "-display",
            "none",
            "-nic",
            "none",
            "-drive",
            f"file={disk},format=raw,if=virtio",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)
        assert vm.poll() is None
        p = run_cli(str(disk), "--from", str(cloud_bootdir_initrd))
        assert p.returncode == 2
        assert "running QEMU holds this image" in p.stderr
    finally:
        vm.terminate()
        vm.wait(30)


@pytest.mark.boot
@pytest.mark.timeout(1200)
def test_qcow2_disk_committed_with_qemu_img(
    grub2_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path
) -> None:
    """A qcow2 DISK: same work on the overlay, committed by qemu-img commit (documented: not crash-atomic)."""
    disk = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(grub2_image), str(disk)], check=True)
    new = cloud_version(cloud_bootdir_initrd)
    p = run_cli("--json", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["committed"]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True
        ).stdout
    )
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert sorted(q.name for q in tmp_path.iterdir()) == ["guest.qcow2"]
    report = boot(disk, fmt="qcow2")
    assert_booted(report.values, new)
    # Already on the convention: a second run only replaces the version (rehearsed with --dry-run).
    p = run_cli("--json", "--dry-run", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["plan"]["facts"]["modules_on_boot"] is True and not out["committed"]
    ops = [s["op"] for s in out["plan"]["steps"]]
    assert "Move" not in ops and "RemoveDir" not in ops and "Symlink" not in ops
    assert "replace" in {c["name"] for c in out["plan"]["checks"] if not c["ok"]}


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.mark.timeout(900)
def test_kill_9_mid_apply_leaves_disk_unchanged_and_next_run_works(
    grub2_image: Path, cloud_bootdir_initrd: Path, tmp_path: Path
) -> None:
    disk = copy_image(grub2_image, tmp_path / "killed.raw")
    before = sha256(disk)
    proc = subprocess.Popen(
        [*CLI, str(disk), "--from", str(cloud_bootdir_initrd)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "update-grub" in line and "guest$" in line:
            break  # the guest is half changed (files copied, modules moved), in the overlay
    else:
        raise AssertionError(f"the run ended before update-grub: rc={proc.wait()}")
    proc.kill()
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 60
    while _processes_mentioning(".vimg-rekernel-killed.raw-") and time.monotonic() < deadline:
        time.sleep(1)  # libguestfs's recovery process stops the appliance once its parent is gone
    assert not _processes_mentioning(".vimg-rekernel-killed.raw-"), "the appliance outlived its parent"
    assert sha256(disk) == before
    assert any(p.name.startswith(".vimg-rekernel-killed.raw-") for p in tmp_path.iterdir())
    # The next run throws the dead run's overlay away and does the whole job.
    p = run_cli("--json", str(disk), "--from", str(cloud_bootdir_initrd))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["committed"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["killed.raw"]
    assert sha256(disk) != before
