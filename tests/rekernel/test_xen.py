"""Retargeting a Debian 12 guest set up like a Xen PV guest (xenbuild.py) to KVM, proven by booting.

One appliance run (``rekernel --target kvm --initramfs``, the guest's own kernel) and two boots
under TCG with virtio disks and a virtio NIC: the untouched guest does not reach a login prompt on
ttyS0 (the negative control), the retargeted one does, with ``/`` and ``/srv`` mounted by UUID and
its NIC up as ``enX0`` with a DHCP lease. The module shares the one retargeted image across its
assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kvmboot
import pytest
import xenbuild

pytestmark = [pytest.mark.slow, pytest.mark.guestfs, pytest.mark.boot]

# The retargeted guest reached its login prompt in 50-70 s here; the control gets clearly more.
CONTROL_SECONDS = 120
BOOT_TIMEOUT = 420


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, LIBGUESTFS_BACKEND_SETTINGS=os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    )
    return subprocess.run(
        [sys.executable, "-m", "vimgtools.rekernel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def xen_image() -> Path:
    return xenbuild.xen_pv_image()


@pytest.fixture(scope="module")
def retargeted(
    xen_image: Path, guest_version: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The Xen guest after ``rekernel --target kvm --initramfs KVM-INITRD`` (one appliance launch)."""
    work = tmp_path_factory.mktemp("xen")
    disk = copy(xen_image, work / "xen.img")
    initrd = xenbuild.kvm_initramfs(guest_version)
    t0 = time.monotonic()
    p = cli("--json", "--target", "kvm", "--initramfs", str(initrd), str(disk))
    seconds = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    return {"disk": disk, "json": json.loads(p.stdout), "seconds": seconds}


def test_untouched_xen_guest_does_not_reach_a_login_prompt(
    xen_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Negative control: without the retarget the guest never gets to a getty on ttyS0."""
    disk = copy(xen_image, tmp_path_factory.mktemp("control") / "xen.img")
    b = kvmboot.boot([disk], timeout=CONTROL_SECONDS)
    assert not b.login_prompt, b.console[-2000:]
    assert "DONE" not in b.values


def test_plan_inventory_and_rewrites(retargeted: dict[str, Any], guest_version: str) -> None:
    obj = retargeted["json"]
    assert obj["action"] == "retarget" and obj["committed"] and obj["bytes_committed"] > 0
    rt = obj["plan"]["retarget"]
    assert set(rt["rewrites"]) == {"/dev/xvda1", "/dev/xvda2"} and all(
        v.startswith("UUID=") for v in rt["rewrites"].values()
    )
    assert rt["inventory"]["disks"][0]["boot_code"] is None and rt["write_boot_code"]
    assert rt["nics"] == ["enX0"]
    ops = [s["describe"] for s in obj["plan"]["steps"]]
    assert any("grub-install" in d for d in ops) and any("update-grub" in d for d in ops)
    assert any("serial-getty@hvc0" in d for d in ops)
    v = obj["verified"]
    assert v["xen_names_left"] == 0 and v["boot_code"] == "grub" and v["fstab"] == "every entry resolves"
    checks = {c["name"]: c for c in obj["plan"]["checks"]}
    assert checks["initramfs-drivers"]["ok"] and checks["initramfs-nic"]["ok"] and checks["kernel-pv"]["ok"]
    print(f"\nretarget: {retargeted['seconds']:.1f} s wall; seconds {obj['seconds']}")


def test_retargeted_guest_boots_to_a_login_prompt(retargeted: dict[str, Any], guest_version: str) -> None:
    b = kvmboot.boot([retargeted["disk"]], timeout=BOOT_TIMEOUT)
    print(f"\nboot of the retargeted guest: {b.seconds:.1f} s")
    assert b.finished and b.values.get("DONE") == "yes", (b.console[-3000:], b.values)
    assert b.login_prompt, b.console[-2000:]
    assert b.values["GETTY"] == "active"
    assert b.values["KERNEL"] == guest_version
    cmdline = b.values["CMDLINE"]
    assert "console=ttyS0,115200" in cmdline and "hvc0" not in cmdline and "xvd" not in cmdline
    assert "root=UUID=" in cmdline
    fstab = dict(reversed(e.split(" ", 1)) for e in b.values["FSTAB"].strip(";").split(";"))  # type: ignore[misc]
    assert fstab["/"].startswith("UUID=") and fstab["/srv"].startswith("UUID=")
    assert b.values["ROOT"].startswith("/dev/vda") and b.values["SRV"].startswith("/dev/vda")
    assert "enX0" in b.values["NICS"].split() and b.values["LEASED"].split() == ["enX0"]
    assert b.seconds < CONTROL_SECONDS, "the negative control must wait longer than a good boot takes"
