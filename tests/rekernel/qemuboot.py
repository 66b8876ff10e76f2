"""Boot a disk image in QEMU (TCG); read the test guest's ``VIMG-KEY=value`` lines from its serial port."""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def copy_image(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


@dataclass
class BootReport:
    values: dict[str, str]
    seconds: float
    log: str

    def __getitem__(self, key: str) -> str:
        return self.values[key]


def boot(image: Path, *, fmt: str = "raw", timeout: float = 420, memory_mb: int = 1024) -> BootReport:
    """Boot ``image`` until the guest powers off (its report unit does), return what it reported."""
    serial = image.with_suffix(image.suffix + ".serial.log")
    serial.unlink(missing_ok=True)
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
        "none",
        "-serial",
        f"file:{serial}",
        "-drive",
        f"file={image},format={fmt},if=virtio",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(argv, timeout=timeout, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    text = serial.read_bytes().decode("utf-8", "replace") if serial.exists() else ""
    if proc.returncode != 0:
        raise AssertionError(f"qemu exited {proc.returncode}: {proc.stderr[-2000:]}\n{text[-3000:]}")
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip().lstrip("\x1b[0-9;HJ")
        i = line.find("VIMG-")
        if i >= 0 and "=" in line[i:]:
            k, v = line[i + 5 :].split("=", 1)
            values[k.strip()] = v.strip()
        elif i >= 0 and line[i:].startswith("VIMG-DONE"):
            values["DONE"] = "yes"
    if "DONE" not in values:
        raise AssertionError(f"the guest did not report (no VIMG-DONE) in {seconds:.0f} s:\n{text[-4000:]}")
    return BootReport(values, seconds, text)
