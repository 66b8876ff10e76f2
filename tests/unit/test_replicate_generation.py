"""replicate's run on a fake backend (plain files stand for a guest's disks at the moment; a dict for
its bitmaps): the per-disk decision, only the bitmap's extents read, and a run that fails after one
disk put back whole. Fast, beside the real QEMU/libvirt tests in tests/replicate."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vimgtools.errors import ImageError
from vimgtools.image import Image
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.dest import replica_identity, restore
from vimgtools.replicate.generation import GuestDisk, decide, run

MiB = 1 << 20


class DirtyImage(Image):
    """A file whose "bitmap" marks the given extents."""

    def __init__(self, path: Path, dirty: list[tuple[int, int]]) -> None:
        super().__init__(path)
        self.dirty = dirty

    def dirty_in(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + length
        return [
            (max(o, offset), min(o + n, end) - max(o, offset))
            for o, n in self.dirty
            if o < end and o + n > offset
        ]


@dataclass
class FakeMoment:
    backend: FakeBackend
    since: dict[str, str | None]
    consistency: str = "crash"
    freeze_seconds: float = 0.0
    lost: dict[str, str] = field(default_factory=dict)

    def open(self, target: str) -> Image:
        if target in self.backend.fail_on:
            raise ImageError(f"{target}: the guest went away")
        path = self.backend.files[target]
        return DirtyImage(path, self.backend.dirty[target]) if self.since.get(target) else Image(path)

    def commit(self, bitmap: str) -> None:
        self.backend.bitmaps = {bitmap}

    def tracking(self, target: str, bitmap: str) -> str | None:
        return bitmap


class FakeBackend:
    def __init__(self, files: dict[str, Path]) -> None:
        self.name, self.uuid = "fake", None
        self.files = files
        self.bitmaps: set[str] = set()
        self.dirty: dict[str, list[tuple[int, int]]] = {t: [] for t in files}
        self.fail_on: set[str] = set()

    def disks(self) -> list[GuestDisk]:
        return [
            GuestDisk(t, str(p), "qcow2", p.stat().st_size, dict.fromkeys(self.bitmaps, True))
            for t, p in self.files.items()
        ]

    @contextlib.contextmanager
    def moment(self, bitmap: str, since: dict[str, str | None], dry_run: bool) -> Iterator[FakeMoment]:
        if not dry_run:
            self.bitmaps.add(bitmap)
        yield FakeMoment(self, since)

    def warnings(self) -> list[str]:
        return []

    def domain_xml(self) -> str | None:
        return None


def write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def guest(tmp_path: Path) -> FakeBackend:
    files = {"vda": tmp_path / "a.img", "vdb": tmp_path / "b.img"}
    for i, p in enumerate(files.values()):
        p.write_bytes(bytes([0x10 + i]) * (4 * MiB))
    return FakeBackend(files)


def test_only_the_bitmaps_extents_are_read(guest: FakeBackend, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    r = run(guest, dest)
    assert [d.mode for d in r.disks] == ["full", "full"]
    write(guest.files["vda"], MiB, b"\x77" * 4096)  # marked dirty
    write(guest.files["vda"], 3 * MiB, b"\x88" * 4096)  # not marked: invisible to an incremental run
    guest.dirty["vda"] = [(MiB, 65536)]
    r = run(guest, dest)
    vda, vdb = r.disks
    assert vda.mode == vdb.mode == "incremental" and vda.bytes_read == 2 * 65536 and vdb.bytes_read == 0
    replica = (dest / "vda.img").read_bytes()
    assert replica[MiB : MiB + 4096] == b"\x77" * 4096 and replica[3 * MiB : 3 * MiB + 4096] == b"\x10" * 4096
    r = run(guest, dest, full=True)  # a scrub finds what the bitmap missed
    assert r.disks[0].mode == "rescan" and "--full" in (r.disks[0].reason or "")
    assert (dest / "vda.img").read_bytes() == guest.files["vda"].read_bytes()


def test_a_run_that_fails_after_one_disk_is_put_back_whole(guest: FakeBackend, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    run(guest, dest)
    before = {p.name: p.read_bytes() for p in dest.glob("*.img")}
    write(guest.files["vda"], 0, b"\x99" * 8192)
    write(guest.files["vdb"], 0, b"\x99" * 8192)
    guest.dirty = {"vda": [(0, 65536)], "vdb": [(0, 65536)]}
    guest.fail_on = {"vdb"}
    with pytest.raises(ImageError):
        run(guest, dest)
    assert (dest / "vda.img").read_bytes() != before["vda.img"]  # vda of generation 2, vdb of 1: a mix
    assert (dest / mf.UNDO_DIR).is_dir() and json.loads((dest / "manifest.json").read_text())[
        "generation"
    ] == 1
    prev = mf.load(dest)
    mixed = {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert restore(dest, prev, dry_run=True) == ["vda.img"]  # what it would put back; nothing written
    assert {p.name: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == mixed
    assert restore(dest, prev) == ["vda.img"]
    assert {p.name: p.read_bytes() for p in dest.glob("*.img")} == before  # generation 1, whole
    assert not (dest / mf.UNDO_DIR).exists()
    assert prev is not None and replica_identity(dest / "vda.img") == prev.disk("vda").replica  # type: ignore[union-attr]
    guest.fail_on = set()
    r = run(guest, dest)  # still incremental: the replica is exactly generation 1's
    assert [d.mode for d in r.disks] == ["incremental", "incremental"] and r.generation == 2
    assert (dest / "vdb.img").read_bytes() == guest.files["vdb"].read_bytes()


def test_decide_says_why(tmp_path: Path) -> None:
    replica = tmp_path / "vda.img"
    replica.write_bytes(b"x")
    ident = replica_identity(replica)
    prev = mf.Disk("vda", "vda.img", "/src", "raw", 100, "vimgtools.gen-1", ident)
    disk = GuestDisk("vda", "/src", "qcow2", 100, {"vimgtools.gen-1": True})
    assert decide(None, disk, ident) == ("full", "first run")
    assert decide(prev, disk, ident) == ("incremental", None)
    assert "missing" in (decide(prev, disk, None)[1] or "")
    cases = {
        "keeps no dirty bitmap": GuestDisk("vda", "/src", "raw", 100, None),
        "missing": GuestDisk("vda", "/src", "qcow2", 100, {}),
        "inconsistent": GuestDisk("vda", "/src", "qcow2", 100, {"vimgtools.gen-1": False}),
        "resized": GuestDisk("vda", "/src", "qcow2", 200, {"vimgtools.gen-1": True}),
    }
    for said, d in cases.items():
        mode, reason = decide(prev, d, ident)
        assert mode == "rescan" and said in (reason or ""), (said, reason)
    replica.write_bytes(b"y")
    assert "replica changed" in (decide(prev, disk, replica_identity(replica))[1] or "")


def test_a_dr_host_whose_prepare_makes_no_undo_area_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older vimgtools on the DR host answers prepare without the undo area: a run that would
    write replicas without undo files (a crash would leave two generations) is refused before
    anything is written; a dry run writes nothing, so it needs none. The far side faked: its
    answer is what is tested (the real one is in tests/replicate/test_ssh_dest.py)."""
    from vimgtools.errors import TransportError
    from vimgtools.replicate.dest import RemoteDir
    from vimgtools.sync.options import SyncOptions

    disk = mf.Disk("vda", "vda.img", "/src/vda.qcow2", "raw", MiB, "vimgtools.gen-1")
    old = mf.Manifest("mail", 1, "2026-12-01T00:00:00Z", "crash", [disk]).to_json()
    dr = RemoteDir("root@dr", "/srv/dr/mail", SyncOptions(rsh="not-ssh"))
    monkeypatch.setattr(dr, "_call", lambda op, **args: {"manifest": old, "identities": {}})
    with pytest.raises(TransportError, match=r"no undo area.*update it"):
        dr.prepare(dry_run=False)
    assert dr.prepare(dry_run=True).undo is None
    monkeypatch.setattr(dr, "_call", lambda op, **args: {"manifest": None, "identities": {}})
    assert dr.prepare(dry_run=False).prev is None  # a first run writes no undo file at all
