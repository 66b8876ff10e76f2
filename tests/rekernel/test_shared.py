"""A shared read-only system disk and two guest root disks (sharedbuild.py), rekernelled in ONE run.

``rekernel SYSTEM --from CLOUD-BOOTDIR --guest ROOT1 --guest ROOT2`` (Debian's cloud kernel with
an initramfs made on the host, xenbuild.kvm_cloud_bootdir): one appliance, one group commit. The
module fixture's run serves every assertion on the plan and the result; then both guests boot at
once under TCG (each with its own ROOT as vda and the shared SYSTEM as vdb, read-only, booted from)
and report on ttyS0: the new kernel, ``dummy`` loaded from ``/boot/modules``. The negative control
boots an untouched copy (Xen names, a Xen-only initramfs): it never reports. Refusals need no boot:
a dry run (every image byte-identical) and a guest image held by a running QEMU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sharedbuild
import xenbuild
from qemuboot import sha256

pytestmark = [pytest.mark.slow, pytest.mark.guestfs, pytest.mark.boot]

BOOT_TIMEOUT = 480
CONTROL_SECONDS = 90
MEASURED: dict[str, float] = {}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, LIBGUESTFS_BACKEND_SETTINGS=os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    )
    return subprocess.run(
        [sys.executable, "-m", "vimgtools.rekernel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )


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


def boot_all(roots: list[Path], system: Path, *, timeout: float) -> list[Boot]:
    """Boot every guest at once (they share SYSTEM read-only) until each powers off or ``timeout``."""
    t0 = time.monotonic()
    vms = [start(r, system) for r in roots]
    ends: list[float | None] = [None] * len(vms)
    while any(e is None for e in ends) and time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        for i, (p, _s) in enumerate(vms):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic() - t0
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
    return out


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ONE ``rekernel SYSTEM --from BOOTDIR --guest ROOT1 --guest ROOT2`` on fresh copies."""
    bootdir = xenbuild.kvm_cloud_bootdir()
    system, root1, root2 = sharedbuild.copy_all(tmp_path_factory.mktemp("shared"))
    t0 = time.monotonic()
    p = cli("--json", str(system), "--from", str(bootdir), "--guest", str(root1), "--guest", str(root2))
    seconds = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    return {"disks": (system, root1, root2), "json": json.loads(p.stdout), "seconds": seconds}


def test_plan_names_the_disk_of_every_change(shared_run: dict[str, Any]) -> None:
    obj = shared_run["json"]
    system, root1, root2 = map(str, shared_run["disks"])
    print(f"\nshared rekernel: {shared_run['seconds']:.1f} s wall; seconds {obj['seconds']}")
    assert obj["action"] == "rekernel-shared" and obj["committed"] and obj["disks"] == [system, root1, root2]
    plan = obj["plan"]
    assert plan["disks"] == {"/dev/sda": system, "/dev/sdb": root1, "/dev/sdc": root2}
    steps = plan["steps"]
    on = {d: [s["describe"] for s in steps if s.get("disk") == d] for d in (system, root1, root2)}
    # The kernel, its modules, the link, the initramfs and the loader: on SYSTEM, once.
    assert sum("vmlinuz-" in d and d.startswith("copy") for d in on[system]) == 1
    assert any(d == "ln -s /boot/modules /usr/lib/modules" for d in on[system])
    assert any("copy modules" in d and "/boot/modules/" in d for d in on[system])
    assert any("initrd.img-" in d for d in on[system]) and "edit /boot/extlinux/extlinux.conf" in on[system]
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


def test_both_guests_boot_the_new_kernel_and_load_a_module_from_boot_modules(
    shared_run: dict[str, Any],
) -> None:
    system, root1, root2 = shared_run["disks"]
    new = shared_run["json"]["plan"]["version"]
    boots = boot_all([root1, root2], system, timeout=BOOT_TIMEOUT)
    for b, name in zip(boots, sharedbuild.GUESTS, strict=True):
        print(f"\n{name}: reported in {b.seconds:.1f} s (both booting at once)")
        assert b.finished and b.values.get("DONE") == "yes", (b.console[-3000:], b.values)
        assert b.values["GUEST"] == name
        assert b.values["KERNEL"] == new
        assert b.values["MODULE"] == f"dummy loaded=yes file=/boot/modules/{new}/kernel/drivers/net/dummy.ko"
        assert b.values["MODULES-LINK"] == f"/boot/modules -> /boot/modules/{new}"
        assert b.values["ROOT"].startswith("/dev/vda") and b.values["USR"].startswith("/dev/vdb2 ro")
        assert b.values["BOOT"] == "/dev/vdb1"
        assert "enX0" in b.values["NICS"].split()
        assert b.values["UNLOADED"].split()[0] == "0", b.values["UNLOADED"]
        assert "console=ttyS0,115200" in b.values["CMDLINE"] and "hvc0" not in b.values["CMDLINE"]
    MEASURED["boot_seconds"] = max(b.seconds for b in boots)


def test_untouched_guests_do_not_boot(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Negative control: the same disks without the run (Xen names, a Xen-only initramfs) never report.

    Given twice the time the rekernelled guests took to report in this run (at least CONTROL_SECONDS).
    """
    system, root1, _root2 = sharedbuild.copy_all(tmp_path_factory.mktemp("control"))
    good = MEASURED.get("boot_seconds")
    limit = max(CONTROL_SECONDS, 2 * good) if good else 2 * CONTROL_SECONDS
    (b,) = boot_all([root1], system, timeout=limit)
    print(f"\nnegative control: no report in {b.seconds:.0f} s (the rekernelled guests: {good} s)")
    assert "DONE" not in b.values and "KERNEL" not in b.values, b.console[-2000:]


# -- refusals and the dry run: nothing written -------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[Path, Path, Path], list[str]]]:
    disks = sharedbuild.copy_all(tmp_path_factory.mktemp("pristine"))
    yield disks, [sha256(d) for d in disks]


def test_dry_run_writes_nothing(pristine: tuple[tuple[Path, Path, Path], list[str]]) -> None:
    (system, root1, root2), sums = pristine
    bootdir = xenbuild.kvm_cloud_bootdir()
    p = cli("-n", str(system), "--from", str(bootdir), "--guest", str(root1), "--guest", str(root2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"[on {system}]" in p.stdout and f"[on {root1}]" in p.stdout and f"[on {root2}]" in p.stdout
    assert "+    APPEND root=/dev/vda1 ro console=tty0 console=ttyS0,115200 quiet" in p.stdout
    assert "rehearsed (dry run, DISK unchanged)" in p.stdout
    assert [sha256(d) for d in (system, root1, root2)] == sums
    assert not list(system.parent.glob(".vimg-rekernel*")) and not list(
        system.parent.glob("*.vimg-rekernel*")
    )


def test_a_guest_image_a_running_qemu_holds_is_refused(
    pristine: tuple[tuple[Path, Path, Path], list[str]],
) -> None:
    (system, root1, root2), sums = pristine
    bootdir = xenbuild.kvm_cloud_bootdir()
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
        p = cli("--json", str(system), "--from", str(bootdir), "--guest", str(root1), "--guest", str(root2))
        seconds = time.monotonic() - t0
    finally:
        vm.kill()
        vm.communicate()
    print(f"\nrefused in {seconds:.1f} s")
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"vimgtools.rekernel: error: {root2}: a running QEMU holds this image"), line
    assert json.loads(p.stdout)["exit_code"] == 2
    assert [sha256(d) for d in (system, root1, root2)] == sums
