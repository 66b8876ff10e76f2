"""Several disks committed together (rekernel.group): all of them, a crash before the commit point
discarded, a crash after it completed by the next run (through the session's Work); and a retarget
over two disks on a FakeGuest naming which disk each change lands on. Real files, no appliance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vimgtools.rekernel.group as group
import vimgtools.rekernel.session as session_mod
from vimgtools.errors import InvalidInput
from vimgtools.guest.fake import FakeGuest
from vimgtools.rekernel.retargeting import retarget
from vimgtools.rekernel.session import Work

MiB = 1 << 20


def disks(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "root.img", tmp_path / "srv.img"
    a.write_bytes(b"A" * MiB)
    b.write_bytes(b"B" * MiB)
    return a, b


def runs(byte: bytes) -> list[tuple[int, bytes]]:
    return [(4096, byte * 4096), (65536, byte * 8192)]


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if "vimg-rekernel" in p.name)


def test_commit_group_writes_every_disk(tmp_path: Path) -> None:
    a, b = disks(tmp_path)
    assert group.commit_group([(a, runs(b"x")), (b, runs(b"y"))]) == [12288, 12288]
    assert a.read_bytes()[4096:8192] == b"x" * 4096 and b.read_bytes()[65536:73728] == b"y" * 8192
    assert leftovers(tmp_path) == []


def test_a_crash_before_the_commit_point_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = disks(tmp_path)
    real = group._write_durable

    def crash_at_marker(path: Path, text: str) -> None:
        if path.name.startswith(group.MARKER_PREFIX):
            raise KeyboardInterrupt  # killed just before the commit point
        real(path, text)

    monkeypatch.setattr(group, "_write_durable", crash_at_marker)
    with pytest.raises(KeyboardInterrupt):
        group.commit_group([(a, runs(b"x")), (b, runs(b"y"))])
    monkeypatch.undo()
    assert set(leftovers(tmp_path)) == {
        "root.img.vimg-rekernel-group",
        "root.img.vimg-rekernel-journal",
        "srv.img.vimg-rekernel-group",
        "srv.img.vimg-rekernel-journal",
    }
    assert group.recover_group(b) == "discarded"
    assert leftovers(tmp_path) == []
    assert a.read_bytes() == b"A" * MiB and b.read_bytes() == b"B" * MiB, "no disk was written"


def test_a_crash_after_the_commit_point_is_completed_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = disks(tmp_path)
    real = group._apply

    def crash_on_second(disk: Path, jpath: Path) -> int:
        if disk == b:
            raise KeyboardInterrupt  # killed between the two disks
        return real(disk, jpath)

    monkeypatch.setattr(group, "_apply", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        group.commit_group([(a, runs(b"x")), (b, runs(b"y"))])
    monkeypatch.undo()
    assert a.read_bytes()[4096:8192] == b"x" * 4096 and b.read_bytes() == b"B" * MiB, "one new, one old"
    record = json.loads((tmp_path / "srv.img.vimg-rekernel-group").read_text())
    assert Path(record["marker"]).exists()
    work = Work(b, "raw", None)  # the next rekernel on either disk completes it under that disk's lock
    work.close()
    assert b.read_bytes()[4096:8192] == b"y" * 4096 and a.read_bytes()[4096:8192] == b"x" * 4096
    assert leftovers(tmp_path) == []
    assert group.recover_group(a) is None


def test_an_unreadable_group_file_stops_the_run(tmp_path: Path) -> None:
    a, _b = disks(tmp_path)
    group.group_path(a).write_text("{not json")
    with pytest.raises(Exception, match="not a vimgtools group commit file"):
        group.recover_group(a)


# -- two disks in one retarget, on the fake -------------------------------------------------------
def test_retarget_over_two_disks_names_the_disk_of_each_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_rekernel_xen import U2, xen_debian

    g: FakeGuest = xen_debian()
    g.mountpoints["/srv"] = "/dev/sdb1"
    g.uuids["/dev/sdb1"] = g.uuids.pop("/dev/sda2")
    g.disks = ["/dev/sda", "/dev/sdb"]
    g.put("/etc/fstab", "/dev/xvda1 / ext4 defaults 0 1\n/dev/xvdb1 /srv ext4 defaults 0 2\n")
    g.put("/srv/data/x.conf", "hvc0\n")
    a, b = disks(tmp_path)
    opened: list[object] = []
    committed: list[list[Path]] = []
    monkeypatch.setattr(session_mod, "open_image", lambda overlays: opened.append(overlays) or g)
    monkeypatch.setattr(
        session_mod, "commit_group", lambda members: committed.append([d for d, _ in members]) or [1, 2]
    )
    monkeypatch.setattr(
        "vimgtools.rekernel.retargeting._host_initramfs",
        lambda gi, path: ([f"usr/lib/modules/x/{m}.ko" for m in (gi.text(path) or "").split()], {}),
    )
    result = retarget([a, b], fmt="raw")
    assert len(opened[0]) == 2, "one appliance on both overlays"  # type: ignore[arg-type]
    assert committed == [[a, b]] and result.bytes_committed == 3 and result.disks == [str(a), str(b)]
    assert (g.text("/etc/fstab") or "").splitlines()[1] == f"UUID={U2} /srv ext4 defaults 0 2"
    assert result.plan is not None
    steps = result.plan.to_dict()["steps"]
    assert {s["disk"] for s in steps} == {str(a)}, "every change of this retarget lands on the root disk"
    from vimgtools.guest.steps import Write

    assert result.plan.disk_of(Write("/srv/data/x.conf", "")) == str(b)
    assert "[on " in result.plan.describe()
    assert result.to_dict()["disks"] == [str(a), str(b)]


def test_several_disks_must_be_raw(tmp_path: Path) -> None:
    a, _b = disks(tmp_path)
    q = tmp_path / "srv.qcow2"
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "1M"], check=True)
    with pytest.raises(InvalidInput, match="only when raw"):
        retarget([a, q])
    assert leftovers(tmp_path) == []
    with pytest.raises(InvalidInput, match="given twice"):
        retarget([a, a])
