"""The work overlay on real qemu-img files (no appliance): its own extents, committed into a raw DISK."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vimgtools.rekernel.overlay import commit_overlay, create_overlay, overlay_extents, probe_format


def test_overlay_extents_are_committed_into_a_raw_disk(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    original = disk.read_bytes()
    assert probe_format(disk) == "raw"
    overlay = create_overlay(disk, "raw", tmp_path)
    assert list(overlay_extents(overlay)) == [], "a fresh overlay holds nothing of its own"
    for cmd in ("write -P 0xab 65536 8192", "write -z 262144 4096"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(overlay)], check=True, capture_output=True)
    runs = list(overlay_extents(overlay, chunk=4096))
    assert all(len(data) <= 4096 for _, data in runs), "in pieces of at most one chunk"
    covered = {off // 4096 for off, _ in runs}
    assert {16, 17, 64} <= covered, "the written blocks (whole qcow2 clusters around them)"
    assert disk.read_bytes() == original, "DISK is only read until the commit"
    assert commit_overlay(overlay, disk, "raw") == sum(len(data) for _, data in runs)
    expected = bytearray(original)
    expected[65536 : 65536 + 8192] = b"\xab" * 8192
    expected[262144 : 262144 + 4096] = bytes(4096)
    assert disk.read_bytes() == bytes(expected)
