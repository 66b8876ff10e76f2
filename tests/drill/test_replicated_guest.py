"""The mission's story end to end: a qcow2 guest replicated (full, then incremental), and the replica
directory booted by the drill. One boot, under TCG; the replicas are only read by the drill."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.boot, pytest.mark.slow]


def run(module: str, *args: str | Path) -> dict[str, object]:
    p = subprocess.run(
        [sys.executable, "-m", module, "--json", *map(str, args)], capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def test_a_replicated_guest_boots(
    base_image: Path, guest_version: str, tmp_path: Path, workdir: Path
) -> None:
    guest = tmp_path / "mail.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(base_image), str(guest)], check=True)
    dest = tmp_path / "dr"
    first = run("vimgtools.replicate", guest, dest)
    second = run("vimgtools.replicate", guest, dest)  # the guest did not run: nothing to read
    assert first["disks"][0]["mode"] == "full"  # type: ignore[index]
    assert second["disks"][0]["mode"] == "incremental" and second["disks"][0]["bytes_read"] == 0  # type: ignore[index]
    before = sha(dest / "vda.img")
    out = run("vimgtools.drill", "--accel", "tcg", "--expect", "VIMG-DONE", "--workdir", workdir, dest)
    assert out["result"] == "booted" and out["kernel"] == guest_version
    assert sha(dest / "vda.img") == before
