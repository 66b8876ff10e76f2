"""The KVM probe against fake qemu binaries: a hang, a refusal and a working KVM; the probe's qemu never stays."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vimgtools.drill.accel import choose_accel, probe_kvm

# A fake qemu: writes its pid, then behaves as $MODE says; finds the console file in -chardev file,...,path=P.
FAKE = """#!/bin/sh
echo $$ > "{pidfile}"
for a in "$@"; do case "$a" in file,id=*,path=*) out="${{a##*path=}}";; esac; done
case "{mode}" in
  hang) exec sleep 600 ;;
  refuse) echo "qemu-system-x86_64: failed to initialize kvm: Permission denied" >&2; exit 1 ;;
  works) printf 'Probing EDD\\r\\n[    0.000000] Linux version 6.1.0-9-amd64 (x@y) #1\\r\\n' > "$out"; exec sleep 600 ;;
  bios) printf 'SeaBIOS (version x)\\nBooting from Hard Disk...\\n' > "$out"; exec sleep 600 ;;
esac
"""


def fake_qemu(tmp_path: Path, mode: str) -> tuple[str, Path]:
    pidfile = tmp_path / f"{mode}.pid"
    script = tmp_path / f"qemu-{mode}"
    script.write_text(FAKE.format(pidfile=pidfile, mode=mode))
    script.chmod(0o755)
    return str(script), pidfile


def gone(pidfile: Path) -> bool:
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return dev


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz-6.1.0-9-amd64"
    k.write_bytes(b"MZ")
    return k


def test_hanging_kvm_times_out_to_tcg(tmp_path: Path, kvm_device: Path, kernel: Path) -> None:
    qemu, pidfile = fake_qemu(tmp_path, "hang")
    t0 = time.monotonic()
    p = probe_kvm(qemu=qemu, device=kvm_device, timeout=1.0, kernel=kernel)
    assert p.accel == "tcg"
    assert "showed nothing under KVM in 1 s" in p.reason
    assert time.monotonic() - t0 < 3
    assert gone(pidfile)


def test_refusing_kvm_falls_back_with_qemus_message(tmp_path: Path, kvm_device: Path, kernel: Path) -> None:
    qemu, _ = fake_qemu(tmp_path, "refuse")
    p = probe_kvm(qemu=qemu, device=kvm_device, timeout=5.0, kernel=kernel)
    assert p.accel == "tcg"
    assert "exited 1" in p.reason and "Permission denied" in p.reason


def test_working_kvm_boots_the_host_kernel(tmp_path: Path, kvm_device: Path, kernel: Path) -> None:
    qemu, pidfile = fake_qemu(tmp_path, "works")
    p = probe_kvm(qemu=qemu, device=kvm_device, timeout=5.0, kernel=kernel)
    assert p.accel == "kvm", p.reason
    assert "vmlinuz-6.1.0-9-amd64" in p.reason
    assert gone(pidfile)


def test_without_a_host_kernel_seabios_is_probed(tmp_path: Path, kvm_device: Path) -> None:
    qemu, _ = fake_qemu(tmp_path, "bios")
    p = probe_kvm(qemu=qemu, device=kvm_device, timeout=5.0, kernel=None)
    assert p.accel == "kvm" and "SeaBIOS" in p.reason


def test_no_device_no_probe(tmp_path: Path) -> None:
    qemu, pidfile = fake_qemu(tmp_path, "works")
    p = probe_kvm(qemu=qemu, device=tmp_path / "no-kvm", timeout=5.0)
    assert p.accel == "tcg" and "does not exist" in p.reason
    assert not pidfile.exists()  # qemu was never started


def test_asked_for_wins_without_probing(tmp_path: Path) -> None:
    qemu, pidfile = fake_qemu(tmp_path, "hang")
    assert choose_accel("kvm", qemu=qemu).accel == "kvm"
    assert choose_accel("tcg", qemu=qemu).reason == "asked for"
    assert not pidfile.exists()
