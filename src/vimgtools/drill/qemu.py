"""The qemu command line of a drill (a pure function of its options) and the process that runs it.

Every qemu the drill starts dies with it: the child asks the kernel for SIGKILL when its parent
thread dies (``prctl(PR_SET_PDEATHSIG)``, before exec), so even ``kill -9`` of the drill leaves no
qemu behind, and it runs in its own session so a Ctrl-C on the terminal reaches only the drill,
which then powers the guest off itself.

References: qemu(1) (``-blockdev``, ``-chardev``, ``-device isa-debugcon``, ``-nic``), prctl(2).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vimgtools.children import die_with_parent
from vimgtools.errors import VimgError

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# SeaBIOS and OVMF write their debug log to this port; the drill reads it as the firmware's log.
DEBUGCON_PORT = 0x402
BUSES = ("virtio", "scsi", "sata", "ide")
ACCELS = ("kvm", "tcg")
NETS = ("none", "user")
QGA_PORT = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class Drive:
    """One disk as the guest sees it: a throw-away qcow2 ``overlay`` over the read-only ``base``."""

    base: Path
    fmt: str
    overlay: Path
    block_device: bool = False


@dataclass(frozen=True)
class Machine:
    """Everything the qemu command line depends on."""

    drives: tuple[Drive, ...]
    accel: str = "tcg"
    memory_mb: int = 1024
    cpus: int = 1
    uefi: bool = False
    vars_file: Path | None = None  # a private copy of OVMF_VARS (UEFI variables are written)
    net: str = "none"
    bus: str = "virtio"
    serial_log: Path = Path("serial.log")
    firmware_log: Path = Path("firmware.log")
    qmp_socket: Path = Path("qmp.sock")
    agent_socket: Path | None = None
    extra: tuple[str, ...] = field(default=())


def _blockdev(obj: dict[str, object]) -> list[str]:
    return ["-blockdev", json.dumps(obj, separators=(",", ":"))]


def argv(m: Machine, qemu: str = QEMU) -> list[str]:
    """The qemu command line for ``m``. The guest starts paused (``-S``): the drill connects QMP first."""
    if m.accel not in ACCELS:
        raise ValueError(f"accel {m.accel!r}")
    a = [
        qemu,
        "-S",
        "-name",
        "vimg-drill",
        "-machine",
        ("q35" if m.uefi else "pc") + f",accel={m.accel}",
        "-cpu",
        "host" if m.accel == "kvm" else "max",
        "-m",
        str(m.memory_mb),
        "-smp",
        str(m.cpus),
        "-display",
        "none",
        "-vga",
        "std",
        "-no-reboot",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        f"file,id=serial0,path={m.serial_log}",
        "-serial",
        "chardev:serial0",
        "-chardev",
        f"file,id=fwlog,path={m.firmware_log}",
        "-device",
        f"isa-debugcon,iobase={DEBUGCON_PORT:#x},chardev=fwlog",
        "-chardev",
        f"socket,id=qmp,path={m.qmp_socket},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if m.uefi:
        if m.vars_file is None:
            raise ValueError("uefi needs a vars file")
        a += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={m.vars_file}",
        ]
    if m.net == "user":
        # restrict=on: the guest reaches neither the host nor the outside, and nothing reaches it.
        a += ["-nic", "user,model=virtio-net-pci,restrict=on"]
    elif m.net == "none":
        a += ["-nic", "none"]
    else:
        raise ValueError(f"net {m.net!r}")
    if m.bus == "scsi":
        a += ["-device", "virtio-scsi-pci,id=scsi0"]
    elif m.bus == "sata" and not m.uefi:
        a += ["-device", "ahci,id=ahci0"]
    for i, d in enumerate(m.drives):
        base_file = "host_device" if d.block_device else "file"
        a += _blockdev(
            {
                "driver": d.fmt,
                "node-name": f"base{i}",
                "read-only": True,
                "file": {"driver": base_file, "filename": str(d.base), "read-only": True},
            }
        )
        a += _blockdev(
            {
                "driver": "qcow2",
                "node-name": f"disk{i}",
                "file": {"driver": "file", "filename": str(d.overlay)},
                "backing": f"base{i}",
            }
        )
        boot = f",bootindex={i}"
        if m.bus == "virtio":
            a += ["-device", f"virtio-blk-pci,drive=disk{i}{boot}"]
        elif m.bus == "scsi":
            a += ["-device", f"scsi-hd,bus=scsi0.0,drive=disk{i}{boot}"]
        elif m.bus in ("sata", "ide") and m.uefi:  # q35: its built-in AHCI, one disk a port
            a += ["-device", f"ide-hd,bus=ide.{i},drive=disk{i}{boot}"]
        elif m.bus == "sata":
            a += ["-device", f"ide-hd,bus=ahci0.{i},drive=disk{i}{boot}"]
        elif m.bus == "ide":
            a += ["-device", f"ide-hd,bus=ide.{i // 2},unit={i % 2},drive=disk{i}{boot}"]
        else:
            raise ValueError(f"bus {m.bus!r}")
    if m.agent_socket is not None:
        a += [
            "-chardev",
            f"socket,id=qga0,path={m.agent_socket},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga0,name={QGA_PORT}",
        ]
    return a + list(m.extra)


class Process:
    """A qemu process that dies with the drill (see the module docstring); ``kill()`` waits for it."""

    def __init__(self, args: list[str], *, stderr_file: Path) -> None:
        self.args = args
        self.stderr_file = stderr_file
        with open(stderr_file, "wb") as err:
            try:
                self.popen = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    preexec_fn=die_with_parent(signal.SIGKILL),
                    start_new_session=True,
                    close_fds=True,
                )
            except FileNotFoundError as e:
                raise VimgError(f"{args[0]} is missing (Debian/Ubuntu: qemu-system-x86)") from e
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stderr_text(self, limit: int = 2000) -> str:
        try:
            return self.stderr_file.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL and reap (a qemu stuck in a hung KVM_RUN still dies of SIGKILL)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
