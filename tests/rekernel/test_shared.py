"""A shared read-only system disk and two guest root disks (sharedbuild.py), rekernelled in ONE run.

``rekernel SYSTEM --from CLOUD-BOOTDIR --guest ROOT1 --guest ROOT2`` with Debian's cloud kernel and
no initramfs in BOOTDIR (guestbuild.cloud_bootdir): the generic initramfs is generated in the first
guest's view (mkinitramfs, MODULES=list of every guest's drivers) and checked on the host; one
appliance, one group commit. The module fixture's run serves every assertion on the plan and the
result; beside it, at the same time, the same command with ``-n`` (and ``--map /dev/xvdb=/dev/sdb``, the
name each guest already gives SYSTEM) on a second set of copies and
BOOTDIR's initramfs *supplied* (xenbuild.kvm_cloud_bootdir, made on the host): that path is
rehearsed and verified in its appliance, not booted (every image hashed before and after). A guest
image a running QEMU holds is refused before any launch. Then both guests boot at once under TCG
(each with its own ROOT as vda and the shared SYSTEM as vdb, read-only, booted from) and report on
ttyS0: the new kernel (whose disk drivers are modules: only the generated initramfs carries them),
``dummy`` loaded from ``/boot/modules``; beside them the negative control, the untouched first guest
(Xen names, a Xen-only initramfs), which never reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guestbuild
import pytest
import sharedbuild
import xenbuild
from imagesum import image_digest

pytestmark = [pytest.mark.slow, pytest.mark.guestfs, pytest.mark.boot]

BOOT_TIMEOUT = 480
CONTROL_SECONDS = 90


def cli(*args: str) -> subprocess.Popen[str]:
    env = dict(
        os.environ, LIBGUESTFS_BACKEND_SETTINGS=os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    )
    return subprocess.Popen(
        [sys.executable, "-m", "vimgtools.rekernel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=1500)
    return p.returncode, out, err


@dataclass
class Boot:
    values: dict[str, str]
    console: str
    seconds: float
    finished: bool  # the guest powered itself off (its report ran)


def start(root: Path, system: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A TCG guest as KVM would run it: its ROOT as vda, SYSTEM as vdb (read-only, the boot disk)."""
    serial = root.with_suffix(".ttyS0.log")
    serial.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-machine", "accel=tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
        "-display", "none", "-no-reboot", "-nic", "user,model=virtio-net-pci",
        "-serial", f"file:{serial}",
        "-drive", f"file={root},format=raw,if=none,id=root",
        "-device", "virtio-blk-pci,drive=root,bootindex=2",
        "-drive", f"file={system},format=raw,if=none,id=sys,readonly=on",
        "-device", "virtio-blk-pci,drive=sys,bootindex=1",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), serial


def boot_all(
    guests: list[tuple[Path, Path]], controls: list[tuple[Path, Path]], *, timeout: float
) -> tuple[list[Boot], list[Boot]]:
    """Boot every (ROOT, SYSTEM) at once until each guest powers off or ``timeout``; the controls
    beside them, for twice as long as the guests took (at least CONTROL_SECONDS)."""
    t0 = time.monotonic()
    vms = [start(r, s) for r, s in [*guests, *controls]]
    ends: list[float | None] = [None] * len(vms)
    n = len(guests)
    while time.monotonic() - t0 < timeout:
        for i, (p, _s) in enumerate(vms):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic() - t0
        good = [e for e in ends[:n] if e is not None]
        if len(good) == n:
            limit = max(CONTROL_SECONDS, 2 * max(good, default=0))
            if all(e is not None for e in ends[n:]) or time.monotonic() - t0 > limit:
                break
        time.sleep(0.5)
    out = []
    for i, (p, serial) in enumerate(vms):
        if p.poll() is None:
            p.kill()
        p.communicate()
        text = serial.read_bytes().decode("utf-8", "replace") if serial.exists() else ""
        values: dict[str, str] = {}
        for line in text.splitlines():
            j = line.find("VIMG-")
            if j >= 0 and "=" in line[j:]:
                k, v = line[j + 5 :].split("=", 1)
                values[k.strip()] = v.strip()
            elif j >= 0 and line[j:].startswith("VIMG-DONE"):
                values["DONE"] = "yes"
        end = ends[i]
        out.append(Boot(values, text, end if end is not None else time.monotonic() - t0, p.returncode == 0))
    return out[:n], out[n:]


def shared_args(disks: tuple[Path, Path, Path], *, supplied: bool) -> list[str]:
    """The command line; BOOTDIR with the initramfs made on the host (``supplied``) or without one."""
    system, root1, root2 = disks
    bootdir = xenbuild.kvm_cloud_bootdir() if supplied else guestbuild.cloud_bootdir(initramfs=False)
    return [str(system), "--from", str(bootdir), "--guest", str(root1), "--guest", str(root2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ONE ``rekernel SYSTEM --from BOOTDIR --guest ROOT1 --guest ROOT2`` on fresh copies, BOOTDIR
    without an initramfs (one is generated), and, at the same time (two appliances, to save wall
    time), the same command with ``-n`` and BOOTDIR's initramfs supplied on a second set of copies,
    every image of which is hashed before and after."""
    real = sharedbuild.copy_all(tmp_path_factory.mktemp("shared"))
    dry = sharedbuild.copy_all(tmp_path_factory.mktemp("dry"))
    sums = [image_digest(d) for d in dry]
    t0 = time.monotonic()
    p_real = cli("--json", *shared_args(real, supplied=False))
    # --map with the name each guest already gives SYSTEM: the -n twin goes through the --map path.
    p_dry = cli("-n", "--map", "/dev/xvdb=/dev/sdb", *shared_args(dry, supplied=True))
    rc, out, err = finish(p_real)
    seconds = time.monotonic() - t0
    assert rc == 0, err[-4000:]
    dry_rc, dry_out, dry_err = finish(p_dry)
    return {
        "disks": real,
        "json": json.loads(out),
        "seconds": seconds,
        "dry": {"disks": dry, "sums": sums, "rc": dry_rc, "out": dry_out, "err": dry_err},
    }


def test_plan_names_the_disk_of_every_change(runs: dict[str, Any]) -> None:
    obj = runs["json"]
    system, root1, root2 = map(str, runs["disks"])
    print(f"\nshared rekernel: {runs['seconds']:.1f} s wall; seconds {obj['seconds']}")
    assert obj["action"] == "rekernel-shared" and obj["committed"] and obj["disks"] == [system, root1, root2]
    plan = obj["plan"]
    assert plan["disks"] == {"/dev/sda": system, "/dev/sdb": root1, "/dev/sdc": root2}
    steps = plan["steps"]
    on = {d: [s["describe"] for s in steps if s.get("disk") == d] for d in (system, root1, root2)}
    # The kernel, its modules, the link, the initramfs and the loader: on SYSTEM, once.
    assert sum("vmlinuz-" in d and d.startswith("copy") for d in on[system]) == 1
    assert any(d == "ln -s /boot/modules /usr/lib/modules" for d in on[system])
    assert any("copy modules" in d and "/boot/modules/" in d for d in on[system])
    assert "edit /boot/extlinux/extlinux.conf" in on[system]
    # The generic initramfs: generated on SYSTEM in the first guest's view, checked on the host.
    v = plan["version"]
    assert plan["initramfs"] == "regenerate:mkinitramfs"
    gen = [d for d in on[system] if "initramfs-tools" in d]
    assert gen[-1].startswith(
        f"run /usr/sbin/mkinitramfs -d /boot/vimgtools/initramfs-tools -o /boot/initrd.img-{v} {v}  # "
    ), gen
    views = [i for i, s in enumerate(steps) if s["op"] == "MountView"]
    assert views[0] < [s["describe"] for s in steps].index(gen[-1]) < views[1]  # in the first guest's view
    assert not any(s["op"] == "Upload" and "initrd" in s["describe"] for s in steps)
    assert plan["initramfs_modules"] == ["virtio_pci", "virtio_blk", "virtio_scsi"]  # ext4 is built in
    ini = obj["verified"]["initramfs"]
    assert ini["source"] == "generated" and ini["path"] == f"/boot/initrd.img-{v}" and ini["files"] > 100
    made = next(d for d in obj["done"] if d["step"] == gen[-1])
    print(f"generic initramfs made in {made['seconds']:.0f} s; its host check in verify")
    # Each guest's own files: on its own disk.
    for root in (root1, root2):
        assert "edit /etc/fstab" in on[root]
        assert any("serial-getty@hvc0" in d for d in on[root])
        assert any("10-vimgtools-enX0.link" in d for d in on[root])
        assert any("vimgtools-boot-modules.service" in d for d in on[root])
        assert not any("vmlinuz" in d or "/boot/" in d.split()[-1] for d in on[root])
    assert [s["describe"].split(":")[0] for s in steps if s["op"] == "MountView"] == [
        f"mount the view of {root1}",
        f"mount the view of {root2}",
    ]
    shared = plan["shared"]
    assert shared["modules_link"]["link"] == "/usr/lib/modules" and shared["modules_link"]["on"] == system
    assert {r["root"] for r in shared["cmdline_roots"]} == {"/dev/vda1"}
    checks = {c["name"]: c for c in plan["checks"]}
    for name in ("root1.raw", "root2.raw"):
        for c in ("shared-boot", "shared-usr", "modules-link", "initramfs-drivers", "root"):
            assert checks[f"{c}:{name}"]["ok"], checks[f"{c}:{name}"]
    for root in (root1, root2):
        v = obj["verified"]["guests"][root]
        assert v["xen_names_left"] == 0 and v["fstab"] == "every entry resolves"
        assert v["modules"] == f"/boot/modules/{plan['version']}"
        assert v["default_entry"]["kernel"] == f"/boot/vmlinuz-{plan['version']}"
    assert not list(Path(system).parent.glob("*vimg-rekernel*")), "no group file, journal or marker left"


def test_dry_run_writes_nothing(runs: dict[str, Any]) -> None:
    d = runs["dry"]
    system, root1, root2 = d["disks"]
    assert d["rc"] == 0, d["err"][-3000:]
    out = d["out"]
    assert f"[on {system}]" in out and f"[on {root1}]" in out and f"[on {root2}]" in out
    assert "+    APPEND root=/dev/vda1 ro console=tty0 console=ttyS0,115200 quiet" in out
    # BOOTDIR's initramfs, checked on the host as the generated one is (not booted here).
    assert "initramfs supplied" in out and "(supplied, checked on the host)" in out
    for check in ("initramfs-generic", "initramfs-version", "initramfs-config"):
        assert f"[ok  ] {check}:" in out, check
    assert "[ok  ] initramfs-drivers:root1.raw" in out and "[ok  ] initramfs-drivers:root2.raw" in out
    assert "run /usr/sbin/mkinitramfs" not in out
    assert "  --map /dev/xvdb -> /dev/vdb (each guest's system disk)" in out
    assert "rehearsed (dry run, DISK unchanged)" in out
    assert [image_digest(p) for p in d["disks"]] == d["sums"], "a dry run wrote an image"
    assert not list(system.parent.glob(".vimg-rekernel*")) and not list(
        system.parent.glob("*.vimg-rekernel*")
    )


def test_a_guest_image_a_running_qemu_holds_is_refused(runs: dict[str, Any]) -> None:
    """Refused before the appliance is launched (exit 2, one line naming the image), nothing written."""
    d = runs["dry"]
    root2 = d["disks"][2]
    vm = subprocess.Popen(
        [
            "qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "64",
            "-drive", f"file={root2},format=raw,if=virtio",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        from vimgtools.image import Image

        deadline = time.monotonic() + 30
        with Image(root2) as img:
            while img.qemu_lock() is None:
                assert vm.poll() is None and time.monotonic() < deadline, "qemu never locked its disk"
                time.sleep(0.1)
        t0 = time.monotonic()
        rc, out, err = finish(cli("--json", *shared_args(d["disks"], supplied=True)))
        seconds = time.monotonic() - t0
    finally:
        vm.kill()
        vm.communicate()
    print(f"\nrefused in {seconds:.1f} s")
    assert rc == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"vimgtools.rekernel: error: {root2}: a running QEMU holds this image"), line
    assert json.loads(out)["exit_code"] == 2
    assert [image_digest(p) for p in d["disks"]] == d["sums"]


@pytest.fixture(scope="module")
def boots(runs: dict[str, Any]) -> tuple[list[Boot], Boot]:
    """Both rekernelled guests booted at once, and beside them the negative control: the untouched
    first guest (the dry run's copies, proven unchanged), given twice as long as they took."""
    system, root1, root2 = runs["disks"]
    dry_system, dry_root1, _ = runs["dry"]["disks"]
    guests, (control,) = boot_all(
        [(root1, system), (root2, system)], [(dry_root1, dry_system)], timeout=BOOT_TIMEOUT
    )
    return guests, control


def test_both_guests_boot_the_new_kernel_and_load_a_module_from_boot_modules(
    runs: dict[str, Any], boots: tuple[list[Boot], Boot]
) -> None:
    new = runs["json"]["plan"]["version"]
    for b, name in zip(boots[0], sharedbuild.GUESTS, strict=True):
        print(f"\n{name}: reported in {b.seconds:.1f} s (three guests booting at once)")
        assert b.finished and b.values.get("DONE") == "yes", (b.console[-3000:], b.values)
        assert b.values["GUEST"] == name
        assert b.values["KERNEL"] == new
        assert b.values["MODULE"] == f"dummy loaded=yes file=/boot/modules/{new}/kernel/drivers/net/dummy.ko"
        assert b.values["MODULES-LINK"] == f"/boot/modules -> /boot/modules/{new}"
        assert b.values["ROOT"] == "/dev/vda1" and b.values["USR"].startswith("/dev/vdb2 ro")
        assert b.values["BOOT"] == "/dev/vdb1"
        assert "enX0" in b.values["NICS"].split()
        assert b.values["UNLOADED"].split()[0] == "0", b.values["UNLOADED"]
        assert "console=ttyS0,115200" in b.values["CMDLINE"] and "hvc0" not in b.values["CMDLINE"]


def test_untouched_guest_does_not_boot(boots: tuple[list[Boot], Boot]) -> None:
    """Negative control: the same disks without the run (Xen names, a Xen-only initramfs) never report."""
    good = max(b.seconds for b in boots[0])
    control = boots[1]
    print(f"\nnegative control: no report in {control.seconds:.0f} s (the rekernelled guests: {good:.0f} s)")
    assert control.seconds >= min(2 * good, BOOT_TIMEOUT) - 1 or control.seconds >= CONTROL_SECONDS
    assert "DONE" not in control.values and "KERNEL" not in control.values, control.console[-2000:]
