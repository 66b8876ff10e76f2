"""Smoke tests of the real parts (guests.py): the libvirt test guest boots, its agent answers, its
workload writes; a shut-off copy of its disks, replicated offline, passes ``check_replica``, and the
same replica with one listed file corrupted fails it (the check is not a rubber stamp)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import guests
import pytest


def test_parse_log_keeps_complete_lines_only() -> None:
    """A line the guest was writing when it was killed is not promised: it is not listed."""
    text = "aa  /var/lib/w/000001\nbb  /srv/w/000002\ncc  /var/lib/w/0000"
    assert guests.parse_log(text) == ["/var/lib/w/000001", "/srv/w/000002"]
    assert guests.parse_log("") == [] and guests.parse_log("aa  /srv/w/000002\n") == ["/srv/w/000002"]


def test_domain_xml_is_what_libvirt_here_accepts(tmp_path: Path) -> None:
    """TCG, virtio qcow2 disks vda/vdb, the agent's channel, the console to a file, no graphics."""
    xml = guests.domain_xml("vimg-test-x", [tmp_path / "a.qcow2", tmp_path / "b.qcow2"], tmp_path / "c.log")
    assert "<domain type='qemu'>" in xml and "<graphics" not in xml and "<video><model type='none'/>" in xml
    assert "<target dev='vda' bus='virtio'/>" in xml and "<target dev='vdb' bus='virtio'/>" in xml
    assert xml.count("type='qcow2'") == 2 and "org.qemu.guest_agent.0" in xml
    assert f"<source path='{tmp_path / 'c.log'}' append='on'/>" in xml


def test_qmp_argv_names_the_nodes_vda_and_vdb(tmp_path: Path) -> None:
    argv = " ".join(guests.qmp_argv([tmp_path / "a.qcow2", tmp_path / "b.qcow2"], tmp_path))
    assert "-accel tcg" in argv and f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off" in argv
    assert "driver=qcow2,file=vda-file,node-name=vda" in argv and "virtio-blk-pci,drive=vdb,id=vdb" in argv
    assert "name=org.qemu.guest_agent.0" in argv


@pytest.mark.boot
@pytest.mark.slow
def test_libvirt_guest_boots_its_agent_answers_and_the_workload_writes(
    libvirt_guest: guests.LibvirtGuest,
) -> None:
    g = libvirt_guest
    assert g.dom.isActive() and g.pid() is not None
    assert g.agent("guest-ping") == {}
    first = g.workload_count()
    t0 = time.monotonic()
    later = g.wait_workload(first + 5)
    rate = (later - first) / (time.monotonic() - t0)
    print(f"\nworkload: {first} -> {later} files, {rate:.1f} files/s")
    files = g.workload_files()
    assert files[:2] == ["/var/lib/w/000001", "/srv/w/000002"]
    text = g.console_text()
    # The check ran before the workload on this first boot: no log yet, nothing to verify.
    assert re.search(r"VIMG-CHECK ok files=0\b", text), g.console_tail()
    assert "VIMG-W start n=1" in text
    assert "VIMG-DONE" not in text  # the report unit (which powers off) is disabled


@pytest.mark.boot
@pytest.mark.slow
@pytest.mark.shuts_down_guest
def test_shut_off_copy_passes_the_check_and_a_corrupted_file_fails_it(
    libvirt_guest: guests.LibvirtGuest, tmp_path: Path
) -> None:
    g = libvirt_guest
    g.wait_workload(10)
    before = g.workload_count()
    t0 = time.monotonic()
    g.shutdown(timeout=120)
    print(f"\nshutdown through the agent: {time.monotonic() - t0:.1f} s")
    # Copies: the offline replicate starts dirty bitmaps in its sources, and the session guest's
    # disks must stay as the tests after this one expect them (no bitmap of ours).
    src = tmp_path / "src"
    src.mkdir()
    images = []
    for disk in g.disks:
        images.append(src / disk.name)
        subprocess.run(["cp", "--sparse=always", str(disk), str(images[-1])], check=True)
    good = tmp_path / "good"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "vimgtools.replicate", *map(str, images), str(good)], check=True)
    print(f"offline replicate: {time.monotonic() - t0:.1f} s")
    listed = guests.replica_files(good)
    assert len(listed) >= before

    # The negative control: the same replica, one listed file of the data disk changed on disk.
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(good / "manifest.json", bad / "manifest.json")
    os.link(good / "vda.img", bad / "vda.img")  # only read by the drill
    subprocess.run(["cp", "--sparse=always", str(good / "vdb.img"), str(bad / "vdb.img")], check=True)
    victim = next(p for p in reversed(listed) if p.startswith("/srv/w/"))
    guests.corrupt_data_file(bad / "vdb.img", victim)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two TCG boots at once: half the wall time
        good_f = pool.submit(guests.check_replica, good, workdir=tmp_path / "check-good")
        bad_f = pool.submit(guests.check_replica, bad, workdir=tmp_path / "check-bad")
        ok, ko = good_f.result(), bad_f.result()
    print(
        f"two replica checks at once: {time.monotonic() - t0:.1f} s (drills {ok.report.seconds:.0f} s, "
        f"{ko.report.seconds:.0f} s); {ok.line}; {ko.line}"
    )

    assert ok.ok, ok.describe()
    assert ok.files == len(listed)
    assert {(f.disk, f.offset) for f in ok.fsck} == {("vda.img", guests.ROOT_OFFSET), ("vdb.img", 0)}
    assert not any(f.needed_recovery for f in ok.fsck), ok.describe()  # shut down cleanly: unmounted

    assert ko.line is not None and ko.line.startswith("VIMG-CHECK bad"), ko.describe()
    assert "failed=1 " in ko.line and victim.replace(" ", "_") in ko.line, ko.line
    assert ko.clean, ko.describe()  # the filesystems are fine: only a file's content is wrong
    assert not ko.ok

    # And the host's fsck is no rubber stamp either: an inode of the data disk cleared behind ext4's back.
    broken = tmp_path / "broken-vdb.img"
    subprocess.run(["cp", "--sparse=always", str(good / "vdb.img"), str(broken)], check=True)
    subprocess.run(["debugfs", "-w", "-R", f"clri {victim.removeprefix('/srv')}", str(broken)], check=True)
    (fs,) = guests.fsck_disk(broken, "raw", tmp_path)
    assert not fs.clean and fs.check_rc == 4, fs.output  # 4: errors left uncorrected (-n)
