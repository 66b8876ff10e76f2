"""drill end to end: real Debian 12 replicas booted in qemu under TCG, the serial console read.

One boot per test. The replicas' own guests run a report unit and power off (no getty on ttyS0),
so the good replica ends with ``--expect VIMG-DONE``; the login-prompt end is the ``login_replica``
(a getty on ttyS0, the kernel not quiet). Each test checks that the replica's sha256 did not change
and (the ``workdir`` fixture) that no qemu of it is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from drillhelp import qemus_under

from vimgtools.drill import Stage, boot
from vimgtools.drill.accel import probe_kvm
from vimgtools.drill.workdir import sweep

pytestmark = [pytest.mark.boot, pytest.mark.slow]

TCG = ["--accel", "tcg"]
JSON_FIELDS = {"result", "kernel", "stages", "accel", "seconds", "log"}


def drill(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vimgtools.drill", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_good_replica_boots_with_every_stage(
    good_replica: Path, guest_version: str, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(good_replica)
    r = drill(*TCG, "--json", "--expect", "VIMG-DONE", "--workdir", workdir, good_replica)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert set(out) == JSON_FIELDS  # no last_lines: it booted
    assert out["result"] == "booted"
    assert out["kernel"] == guest_version  # a quiet console: read from guest memory
    assert [s["name"] for s in out["stages"]] == ["firmware", "bootloader", "kernel", "userspace", "expect"]
    times = {s["name"]: s["seconds"] for s in out["stages"]}
    assert times["kernel"] is None  # the console is quiet: not seen, only implied
    assert (
        0 < times["firmware"] <= times["bootloader"] < times["userspace"] <= times["expect"] <= out["seconds"]
    )
    assert out["accel"] == "tcg"
    log = Path(out["log"])
    assert log.parent.parent == workdir and "VIMG-DONE" in log.read_text()
    assert not list(workdir.glob("*/*.qcow2"))  # overlays gone, logs kept
    check()


def test_login_prompt_with_stage_progress(
    login_replica: Path, guest_version: str, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(login_replica)
    seen: list[Stage] = []
    report = boot([login_replica], accel="tcg", workdir=workdir, progress=seen.append, grace=10)
    assert report.booted, report.reason
    assert [s.name for s in seen] == ["firmware", "bootloader", "kernel", "userspace", "login"]
    assert all(s.seconds is not None for s in seen)
    assert report.kernel == guest_version
    assert guest_version in report.stages[2].detail and "Linux version line" in report.stages[2].detail
    assert report.stages[-1].detail.endswith("login:")
    # A minbase guest has neither logind (no dbus) nor acpid: the power button goes unheard, qemu is killed.
    assert report.stopped == "forced"
    assert any("did not power off within 10 s" in n for n in report.notes)
    check()


def test_agent_answers(
    agent_replica: Path, guest_version: str, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(agent_replica)
    report = boot([agent_replica], accel="tcg", agent=True, workdir=workdir, grace=20)
    assert report.booted, report.reason
    assert [s.name for s in report.stages][-1] == "agent"
    assert report.kernel == guest_version
    assert report.os_info is not None and report.os_info["kernel-release"] == guest_version
    assert "Debian GNU/Linux 12" in report.stages[-1].detail
    # guest-shutdown asked; a loaded TCG host may take longer than the grace period to power off
    assert report.stopped in ("agent", "forced")
    check()


def test_zeroed_mbr_fails_at_the_boot_loader_stage(
    mbr_replica: Path, workdir: Path, tmp_path: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(mbr_replica)
    shot = tmp_path / "screen.png"
    r = drill(
        *TCG, "--timeout", "25", "--grace", "5", "--screenshot", shot, "--workdir", workdir, mbr_replica
    )
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("drill: did NOT boot")
    assert any(ln.split()[:1] == ["firmware"] and "Booting from 0000:7c00" in ln for ln in lines)
    assert any(ln.split() == ["bootloader", "FAILED", "HERE"] for ln in lines), r.stdout
    assert "last stage reached: firmware" in lines
    assert "note: nothing on the serial console: this guest's console is not on ttyS0" in lines
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check()


def test_broken_fstab_fails_after_the_kernel_with_the_emergency_shell(
    fstab_replica: Path, guest_version: str, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(fstab_replica)
    r = drill(*TCG, "--json", "--grace", "5", "--workdir", workdir, fstab_replica)
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {*JSON_FIELDS, "last_lines"}
    assert out["result"] == "failed"
    assert out["kernel"] == guest_version
    names = [s["name"] for s in out["stages"]]
    assert names[:3] == ["firmware", "bootloader", "kernel"] and "login" not in names
    text = "\n".join(out["last_lines"])
    assert len(out["last_lines"]) <= 20
    assert "You are in emergency mode" in text
    assert "Dependency failed for srv.mount" in text or "Dependency failed for loca" in text
    check()


def test_uefi_on_a_bios_only_guest_finds_no_boot_loader(
    good_replica: Path, workdir: Path, unchanged: Callable[[Path], Callable[[], None]]
) -> None:
    check = unchanged(good_replica)
    report = boot([good_replica], accel="tcg", uefi=True, workdir=workdir, grace=5, timeout=120)
    assert not report.booted
    assert report.reason == "the firmware found nothing to boot and started the UEFI shell"
    assert report.failed_stage == "firmware" and report.stages == []
    assert report.seconds < 60
    check()


def test_sigkill_of_the_drill_leaves_no_qemu(good_replica: Path, workdir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "vimgtools.drill", *TCG, "--workdir", str(workdir), str(good_replica)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        deadline = time.monotonic() + 60
        while not qemus_under(workdir):
            assert time.monotonic() < deadline, "qemu never started"
            assert proc.poll() is None
            time.sleep(0.2)
        qemu = qemus_under(workdir)
        time.sleep(2)  # booting
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while qemus_under(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not qemus_under(workdir), f"qemu {qemu} outlived the drill"
    (run,) = workdir.glob("vimg-drill-*")
    assert list(run.glob("*.qcow2"))  # the killed drill could not clean up
    sweep(workdir)  # what the next drill does first
    assert not list(run.glob("*.qcow2")) and (run / "serial.log").exists()


def test_kvm_probe_answers_within_its_time_limit(tmp_path: Path) -> None:
    """Here /dev/kvm exists but nested KVM hangs a kernel: the probe must give up and say TCG."""
    t0 = time.monotonic()
    p = probe_kvm(timeout=4.0)
    assert time.monotonic() - t0 < 10
    assert p.accel in ("kvm", "tcg")
    if Path("/dev/kvm").exists() and p.accel == "tcg":
        assert p.reason
    assert not qemus_under(Path("vimg-drill-probe-"))
