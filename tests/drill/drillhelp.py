"""Helpers of the drill tests."""

from __future__ import annotations

from pathlib import Path


def qemus_under(path: Path) -> list[int]:
    """qemu processes whose command line names ``path`` (the test's private directory)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd and b"qemu-system" in cmd[0] and state != "Z" and any(str(path).encode() in a for a in cmd):
            found.append(int(p.name))
    return found
