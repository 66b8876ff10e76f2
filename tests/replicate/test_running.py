"""Replicating running guests for real: a Debian 12 guest under TCG writing numbered, fsync'd files
(tests/replicate/guests.py), through a real libvirtd (checkpoints, pull-mode backup, the guest agent's
freeze) and through QMP without libvirt; each replica proven by booting it (the guest's own check
of every file its log lists) and by fsck on the host.

One libvirt guest boots for the session; the tests run in file order and share it (the tracking
tests leave it running, with its last generation in their DEST)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import guests
import pytest
from rephelp import replicate_json

pytestmark = [pytest.mark.boot, pytest.mark.slow]


def checkpoints(g: guests.LibvirtGuest) -> list[str]:
    return sorted(c.getName() for c in g.dom.listAllCheckpoints(0))


def no_backup_job(g: guests.LibvirtGuest) -> bool:
    try:
        g.dom.backupGetXMLDesc()
    except Exception:  # libvirt: "no domain backup job present"
        return True
    return False


def test_libvirt_guest_full_then_incremental_while_it_writes(
    libvirt_guest: guests.LibvirtGuest, tmp_path: Path
) -> None:
    g = libvirt_guest
    dest = tmp_path / "dr"
    g.wait_workload(10)
    out, err = replicate_json(g.name, dest)
    assert out["generation"] == 1 and out["consistency"] == "application", err
    assert [(d["target"], d["mode"]) for d in out["disks"]] == [("vda", "full"), ("vdb", "full")]
    assert out["freeze_seconds"] > 0  # frozen for the backup's start (its length: the benchmark's)
    print(f"freeze window, full run: {out['freeze_seconds']:.3f} s")
    assert checkpoints(g) == ["vimgtools.gen-1"] and no_backup_job(g)
    before = g.wait_workload(g.workload_count() + 10)  # a day of mail
    out, err = replicate_json(g.name, dest)
    vda, vdb = out["disks"]
    assert out["generation"] == 2 and vda["mode"] == vdb["mode"] == "incremental", err
    assert out["consistency"] == "application"
    print(
        f"freeze window, incremental run: {out['freeze_seconds']:.3f} s; read {vda['bytes_read'] + vdb['bytes_read']} bytes"
    )
    # Only the dirty extents were read: a small part of the 3 GiB + 1 GiB disks.
    assert vda["bytes_read"] + vdb["bytes_read"] < 256 << 20
    assert checkpoints(g) == ["vimgtools.gen-2"] and no_backup_job(g)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["uuid"] == g.dom.UUIDString() and manifest["guest"] == g.name
    assert [d["bitmap"] for d in manifest["disks"]] == ["vimgtools.gen-2"] * 2
    clone = ET.parse(dest / "domain.xml").getroot()
    sources = [d.find("source").get("file") for d in clone.findall("./devices/disk")]  # type: ignore[union-attr]
    assert sources == [str(dest.resolve() / "vda.img"), str(dest.resolve() / "vdb.img")]
    result = guests.check_replica(dest, workdir=tmp_path / "check")
    assert result.ok, result.describe()
    assert result.files >= before  # every file logged before the moment is in the replica, whole


def test_libvirt_kill_9_of_vimgtools_leaves_a_whole_generation(
    libvirt_guest: guests.LibvirtGuest, tmp_path: Path
) -> None:
    g = libvirt_guest
    dest = tmp_path / "dr"
    replicate_json(g.name, dest)
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen([sys.executable, "-m", "vimgtools.replicate", "-q", g.name, str(dest)])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        subprocess.run(
            [sys.executable, "-m", "vimgtools.replicate", "-q", "--recover", str(dest)], check=True
        )
        manifest = json.loads((dest / "manifest.json").read_text())
        assert manifest["generation"] in (1, 2, 3, 4)
    out, err = replicate_json(g.name, dest)  # the next run cleans up after the killed ones and is whole
    assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"], err
    # Only this generation's checkpoint (a name of its own when a killed run's had taken gen-N).
    bitmap = json.loads((dest / "manifest.json").read_text())["disks"][0]["bitmap"]
    assert bitmap.startswith(f"vimgtools.gen-{out['generation']}")
    assert checkpoints(g) == [bitmap] and no_backup_job(g)
    assert not list(Path("/var/tmp").glob(f"vimgtools-{g.name}-*"))


def test_libvirt_disk_resized_between_runs(libvirt_guest: guests.LibvirtGuest, tmp_path: Path) -> None:
    g = libvirt_guest
    dest = tmp_path / "dr"
    replicate_json(g.name, dest)
    size = g.dom.blockInfo("vdb")[0]
    g.dom.blockResize("vdb", size + (64 << 20), 1)  # VIR_DOMAIN_BLOCK_RESIZE_BYTES
    out, err = replicate_json(g.name, dest)
    vda, vdb = out["disks"]
    assert vda["mode"] == "incremental" and vdb["mode"] == "rescan" and "resized" in vdb["reason"], err
    assert (dest / "vdb.img").stat().st_size == size + (64 << 20)


def test_libvirt_guest_killed_then_shut_off_then_running_again(
    libvirt_guest: guests.LibvirtGuest, tmp_path: Path
) -> None:
    """QEMU killed (a host crash): its bitmaps are lost or inconsistent. The shut-off guest is
    replicated from its images (no tracking started: its bitmaps are libvirt's checkpoints'); running
    again, every disk is compared in full from a fresh backup, the stale checkpoint goes, and the run
    after it is incremental again."""
    g = libvirt_guest
    dest = tmp_path / "dr"
    replicate_json(g.name, dest)
    g.wait_workload(g.workload_count() + 5)
    g.destroy(sigkill=True)
    out, err = replicate_json(g.name, dest)  # shut off: its images, as QEMU left them
    assert out["consistency"] == "offline" and out["generation"] == 2, err
    assert all(d["mode"] == "rescan" for d in out["disks"]), out  # the bitmaps died with QEMU
    # Crash-consistent: every filesystem clean once its journal is replayed, as a mount would
    # (checked on the host: CI time; the first test boots its replica), the workload's log there.
    (tmp_path / "fsck").mkdir()
    fsck = [f for d in ("vda.img", "vdb.img") for f in guests.fsck_disk(dest / d, "raw", tmp_path / "fsck")]
    assert fsck and all(f.clean for f in fsck), [f.output for f in fsck]
    assert guests.replica_files(dest)
    g.start()
    g.wait_agent(420)
    g.wait_workload(g.workload_count() + 5)
    out, err = replicate_json(g.name, dest)
    assert out["consistency"] == "application" and all(d["mode"] == "rescan" for d in out["disks"]), err
    # The shut-off generation started no tracking (only libvirt may touch its checkpoints' bitmaps).
    assert "started no tracking" in out["disks"][0]["reason"] and "started no tracking" in err
    out, err = replicate_json(g.name, dest)
    assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"], err
    assert checkpoints(g) == [f"vimgtools.gen-{out['generation']}"]


def test_qmp_guest_without_libvirt(qmp_guest: guests.QmpGuest, tmp_path: Path) -> None:
    g = qmp_guest
    dest = tmp_path / "dr"
    g.wait_workload(10)
    out, err = replicate_json("--agent", g.agent_socket, f"qmp:{g.qmp_socket}", dest)
    assert out["consistency"] == "application" and [d["mode"] for d in out["disks"]] == ["full", "full"], err
    before = g.wait_workload(g.workload_count() + 10)
    out, err = replicate_json("--agent", g.agent_socket, f"qmp:{g.qmp_socket}", dest)
    assert [d["mode"] for d in out["disks"]] == ["incremental", "incremental"], err
    print(f"qmp: freeze window {out['freeze_seconds']:.3f} s")
    # The replica is not booted here (CI time: the libvirt tests boot theirs; test_qmp.py compares
    # QMP replicas byte for byte); the workload's log in it lists at least what was logged before.
    assert len(guests.replica_files(dest)) >= before
