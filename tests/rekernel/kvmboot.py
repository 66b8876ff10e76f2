"""Boot disk images the way KVM would attach them (virtio disks, a virtio NIC on user-mode networking)
under QEMU TCG, with two serial ports: ttyS0 (the console and its getty) and ttyS1 (the Xen-shaped test
guests' report, ``VIMG-KEY=value`` lines, see xenbuild.py).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KvmBoot:
    console: str  # what ttyS0 showed
    values: dict[str, str]  # the report on ttyS1
    seconds: float
    finished: bool  # the guest powered itself off (its report unit ran)
    login_seconds: float | None = None  # when the login prompt showed on ttyS0

    @property
    def login_prompt(self) -> bool:
        return " login: " in self.console or self.console.rstrip().endswith("login:")


def boot(disks: list[Path], *, timeout: float, memory_mb: int = 1024, fmt: str = "raw") -> KvmBoot:
    """Boot until the guest powers off or ``timeout`` seconds pass (then QEMU is killed)."""
    work = disks[0].parent
    s0, s1 = work / f"{disks[0].name}.ttyS0.log", work / f"{disks[0].name}.ttyS1.log"
    for f in (s0, s1):
        f.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64",
        "-machine",
        "accel=tcg",
        "-cpu",
        "max",
        "-m",
        str(memory_mb),
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "user,model=virtio-net-pci",
        "-serial",
        f"file:{s0}",
        "-serial",
        f"file:{s1}",
    ]
    for d in disks:
        argv += ["-drive", f"file={d},format={fmt},if=virtio"]
    t0 = time.monotonic()
    with open(work / f"{disks[0].name}.qemu.log", "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        login_seconds: float | None = None
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            time.sleep(0.5)
            if login_seconds is None and s0.exists() and b" login: " in s0.read_bytes():
                login_seconds = time.monotonic() - t0
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        finished = proc.returncode == 0
    seconds = time.monotonic() - t0
    console = s0.read_bytes().decode("utf-8", "replace") if s0.exists() else ""
    report = s1.read_bytes().decode("utf-8", "replace") if s1.exists() else ""
    values: dict[str, str] = {}
    for line in report.splitlines():
        i = line.find("VIMG-")
        if i >= 0 and "=" in line[i:]:
            k, v = line[i + 5 :].split("=", 1)
            values[k.strip()] = v.strip()
        elif i >= 0 and line[i:].startswith("VIMG-DONE"):
            values["DONE"] = "yes"
    return KvmBoot(console, values, seconds, finished, login_seconds)
