"""Xen guests the GRUB cases do not cover (xencases.py), each in a real appliance, all runs at once.

- a partitionless Xen guest (NORD's layout, no boot code): refused, with the way out printed;
- a Xen guest whose default kernel is a (synthetic) PV-only one, without ``--from``: refused;
- the extlinux Xen guest, retargeted with a supplied initramfs: the plan writes syslinux's MBR and
  reinstalls extlinux, rewrites ``APPEND``, verifies (the boot code read back from the guest's MBR)
  and commits; then it is booted from its disk under TCG as KVM would run it (kvmboot: virtio disk
  and NIC; nothing else boots a Xen extlinux guest whose boot code
  rekernel wrote): a login prompt on ttyS0, its own kernel with ``root=UUID=`` and
  ``console=ttyS0``, ``/`` by UUID, ``enX0`` with a DHCP lease; beside it, at the same time, the
  untouched copy (no boot code in its MBR) is the negative control and never shows a prompt.

Each refusal exits 2 with one line naming the image, and leaves it byte-identical. The three runs
start together (one appliance each) to keep the wall time near one run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import guestbuild
import kvmboot
import pytest
import xenbuild
import xencases
from imagesum import image_digest
from qemuboot import copy_image

from vimgtools.guest.facts import boot_code_of

pytestmark = [pytest.mark.slow, pytest.mark.guestfs]

BOOT_TIMEOUT = 420
CONTROL_TIMEOUT = 240  # the retargeted extlinux guest reached its prompt in 71-86 s here


def start(*args: str) -> subprocess.Popen[str]:
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    work = tmp_path_factory.mktemp("xen-cases")
    images = {
        "partitionless": copy_image(xencases.xen_partitionless(), work / "nord-xen.img"),
        "pv": copy_image(xencases.xen_extlinux_pv(), work / "pv-xen.img"),
        "extlinux": copy_image(xencases.xen_extlinux(), work / "extlinux-xen.img"),
    }
    sums = {k: image_digest(p) for k, p in images.items()}
    initrd = xenbuild.kvm_initramfs(guestbuild.guest_kernel_version(guestbuild.debootstrap_tree()))
    t0 = time.monotonic()
    procs = {
        "partitionless": start("--json", "--target", "kvm", str(images["partitionless"])),
        "pv": start("--json", "--target", "kvm", str(images["pv"])),
        "extlinux": start("--json", "--target", "kvm", "--initramfs", str(initrd), str(images["extlinux"])),
    }
    out: dict[str, dict[str, Any]] = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=1200)
        out[k] = {
            "rc": p.returncode,
            "json": json.loads(stdout) if stdout.strip() else {},
            "stderr": stderr,
            "image": images[k],
            "same": image_digest(images[k]) == sums[k],
            "seconds": round(time.monotonic() - t0, 1),
        }
    print(f"\nthree runs at once: {[(k, v['seconds']) for k, v in out.items()]}")
    return out


def last_line(r: dict[str, Any]) -> str:
    return str(r["stderr"].strip().splitlines()[-1])


def test_partitionless_xen_guest_is_refused_with_the_way_out(runs: dict[str, dict[str, Any]]) -> None:
    r = runs["partitionless"]
    assert r["rc"] == 2, r["stderr"][-3000:]
    line = last_line(r)
    assert line.startswith(
        f"vimgtools.rekernel: error: {r['image']}: preflight: boot-code: /dev/sda has no partition table"
    )
    assert "-kernel vmlinuz-" in line and "<kernel>/boot/vmlinuz-" in line and "root=UUID=" in line
    checks = {c["name"]: c for c in r["json"]["plan"]["checks"]}
    assert not checks["boot-code"]["ok"] and checks["boot-code"]["refuses_as"] == "BootloaderError"
    assert r["json"]["plan"]["retarget"]["rewrites"]["/dev/xvda"].startswith("UUID=")
    assert r["same"], "a refused run wrote the image"


def test_pv_only_default_kernel_is_refused_without_from(runs: dict[str, dict[str, Any]]) -> None:
    r = runs["pv"]
    assert r["rc"] == 2, r["stderr"][-3000:]
    line = last_line(r)
    assert line.startswith(
        f"vimgtools.rekernel: error: {r['image']}: preflight: kernel-pv: {xencases.PV_VERSION}"
    )
    assert "PV-only" in line and "--from BOOTDIR" in line
    assert r["json"]["plan"]["retarget"]["inventory"]["kernels"][xencases.PV_VERSION]["pv_only"] is True
    assert r["same"], "a refused run wrote the image"


def test_extlinux_xen_guest_retargeted(runs: dict[str, dict[str, Any]]) -> None:
    r = runs["extlinux"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    obj = r["json"]
    assert not obj["dry_run"] and obj["committed"] and obj["plan"]["loader"] == "extlinux"
    rt = obj["plan"]["retarget"]
    assert rt["write_boot_code"] and rt["rewrites"]["/dev/xvda1"].startswith("UUID=")
    ops = [s["describe"] for s in obj["plan"]["steps"]]
    assert any("extlinux --install /boot/extlinux" in d for d in ops)
    assert any('dd if=/usr/lib/syslinux/mbr/mbr.bin of="$d" bs=440' in d for d in ops)
    conf = next(s for s in obj["plan"]["steps"] if s["describe"] == "edit /boot/extlinux/extlinux.conf")
    assert "+    APPEND root=UUID=" in conf["diff"] and "console=tty0 console=ttyS0,115200" in conf["diff"]
    v = obj["verified"]
    assert v["xen_names_left"] == 0 and v["boot_code"] == "syslinux"
    assert not r["same"]


@pytest.mark.boot
def test_extlinux_xen_guest_boots_from_the_boot_code_written(
    runs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The retargeted copy boots to a login prompt; beside it, at the same time, the untouched copy
    (the negative control) does not, given CONTROL_TIMEOUT (about twice what the retargeted one takes
    here)."""
    r = runs["extlinux"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    untouched = copy_image(xencases.xen_extlinux(), tmp_path_factory.mktemp("control") / "extlinux-xen.img")
    with open(untouched, "rb") as f:
        assert boot_code_of(f.read(512)) is None, "pygrub needed no boot code"
    with open(r["image"], "rb") as f:
        assert boot_code_of(f.read(512)) == "syslinux"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(kvmboot.boot, [untouched], timeout=CONTROL_TIMEOUT)
        b = kvmboot.boot([r["image"]], timeout=BOOT_TIMEOUT)
        control = pending.result()
    print(f"\nthe retargeted extlinux guest: login prompt at {b.login_seconds} s, off at {b.seconds:.1f} s")
    print(
        f"negative control: no login prompt in {control.seconds:.0f} s, {len(control.console)} bytes on ttyS0"
    )
    assert not control.login_prompt and "DONE" not in control.values, control.console[-2000:]
    assert control.seconds >= min(2 * b.seconds, CONTROL_TIMEOUT) - 1
    assert b.finished and b.values.get("DONE") == "yes", (b.console[-3000:], b.values)
    assert b.login_prompt and b.values["GETTY"] == "active", b.console[-2000:]
    assert b.values["KERNEL"] == guestbuild.guest_kernel_version(guestbuild.debootstrap_tree())
    cmdline = b.values["CMDLINE"]
    assert "root=UUID=" in cmdline and "console=ttyS0,115200" in cmdline
    assert "hvc0" not in cmdline and "xvd" not in cmdline
    assert b.values["FSTAB"].startswith("UUID=") and b.values["ROOT"].startswith("/dev/vda")
    assert "enX0" in b.values["NICS"].split() and b.values["LEASED"].split() == ["enX0"]


def test_cases_are_what_they_say(runs: dict[str, dict[str, Any]]) -> None:
    """The builders made what the refusals are about (so a refusal for another reason would show)."""
    pv = runs["pv"]["json"]["plan"]["checks"]
    failed = [c["name"] for c in pv if not c["ok"] and c["severity"] == "error"]
    assert failed[0] == "kernel-pv" and set(failed[1:]) <= {
        f"kvm-driver:{m}" for m in ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "ext4")
    }
    part = runs["partitionless"]["json"]["plan"]["checks"]
    assert [c["name"] for c in part if not c["ok"]] == ["boot-code"]
