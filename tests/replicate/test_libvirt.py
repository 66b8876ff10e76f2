"""Replicating libvirt domains through a real libvirtd, without booting an OS (fast): a domain whose
disks hold data written before it started; libvirt's checkpoints, pull-mode backup and NBD export
are the real ones. The guest writing while it is copied is test_running.py's."""

from __future__ import annotations

import contextlib
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guests
import pytest
from rephelp import replicate_json
from synchelp import MiB, digest

from vimgtools.bindings import load_libvirt, load_libvirt_qemu

pytestmark = pytest.mark.slow


DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}/sys.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{d}/data.raw'/><target dev='vdb' bus='virtio'/></disk>
    <controller type='virtio-serial'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <video><model type='none'/></video>
  </devices>
</domain>"""


class Domain:
    def __init__(self, uri: str, where: Path, name: str) -> None:
        self.lv = load_libvirt()
        self.conn = self.lv.open(uri)
        self.where, self.name = where, name
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(where / "sys.qcow2"), "64M"], check=True
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x12 40M 2M", str(where / "sys.qcow2")],
            check=True, capture_output=True,
        )  # fmt: skip
        (where / "data.raw").write_bytes(b"\x22" * MiB + bytes(15 * MiB))
        self.dom = self.conn.defineXML(DOMAIN.format(name=name, d=where))
        self.dom.create()

    def checkpoints(self) -> list[str]:
        return sorted(c.getName() for c in self.dom.listAllCheckpoints(0))

    def qmp(self, cmd: str, **args: Any) -> Any:
        out = load_libvirt_qemu().qemuMonitorCommand(
            self.dom, json.dumps({"execute": cmd, "arguments": args}), 0
        )
        return json.loads(out).get("return")


@pytest.fixture
def domain(libvirtd: str, libvirt_tmp: Path) -> Iterator[Domain]:
    d = Domain(libvirtd, libvirt_tmp, guests.DOMAIN_PREFIX + "blank")
    yield d
    guests.undefine_domain(d.dom)
    with contextlib.suppress(d.lv.libvirtError):
        guests.undefine_domain(d.conn.lookupByName(guests.DOMAIN_PREFIX + "clone"))


def test_full_then_incremental_without_an_agent(domain: Domain, tmp_path: Path) -> None:
    dest = tmp_path / "dr"
    out, err = replicate_json(domain.name, dest)
    assert out["generation"] == 1 and out["consistency"] == "crash" and "crash-consistent" in err
    assert [(d["target"], d["mode"]) for d in out["disks"]] == [("vda", "full"), ("vdb", "full")]
    assert domain.checkpoints() == ["vimgtools.gen-1"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["uuid"] == domain.dom.UUIDString() and manifest["consistency"] == "crash"
    assert [d["bitmap"] for d in manifest["disks"]] == ["vimgtools.gen-1", None]  # raw: no bitmap
    clone = ET.parse(dest / "domain.xml").getroot()
    assert [
        (d.find("source").get("file"), d.find("driver").get("type")) for d in clone.findall("./devices/disk")
    ] == [  # type: ignore[union-attr]
        (str(dest / "vda.img"), "raw"),
        (str(dest / "vdb.img"), "raw"),
    ]
    with open(dest / "vda.img", "rb") as f:
        f.seek(40 * MiB)
        assert f.read(4096) == b"\x12" * 4096
    assert digest(dest / "vdb.img") == digest(domain.where / "data.raw")
    out, err = replicate_json(domain.name, dest)
    vda, vdb = out["disks"]
    assert vda["mode"] == "incremental" and vda["bytes_read"] == 0  # nothing written since
    assert vdb["mode"] == "rescan" and "raw" in vdb["reason"]
    assert domain.checkpoints() == ["vimgtools.gen-2"]
    assert not list(Path("/var/tmp").glob(f"vimgtools-{domain.name}-*"))


def test_dry_run_adds_no_checkpoint(domain: Domain, tmp_path: Path) -> None:
    out, _ = replicate_json("-n", domain.name, tmp_path / "dr")
    assert out["dry_run"] is True and not (tmp_path / "dr").exists() and domain.checkpoints() == []
    replicate_json(domain.name, tmp_path / "dr")
    before = {p.name: digest(p) for p in (tmp_path / "dr").iterdir()}
    out, _ = replicate_json("-n", domain.name, tmp_path / "dr")
    assert out["disks"][0]["mode"] == "incremental"
    assert {p.name: digest(p) for p in (tmp_path / "dr").iterdir()} == before
    assert domain.checkpoints() == ["vimgtools.gen-1"]


def test_bitmap_gone_behind_libvirts_back(domain: Domain, tmp_path: Path) -> None:
    """The checkpoint's bitmap removed from the image (a restore, a reinstall): libvirt says
    "checkpoint inconsistent"; our checkpoints go, every disk is read in full, then incremental again."""
    dest = tmp_path / "dr"
    replicate_json(domain.name, dest)
    node = next(
        n["node-name"] for n in domain.qmp("query-named-block-nodes", flat=True)
        if any(b.get("name") == "vimgtools.gen-1" for b in n.get("dirty-bitmaps", []))
    )  # fmt: skip
    domain.qmp("block-dirty-bitmap-remove", node=node, name="vimgtools.gen-1")
    out, err = replicate_json(domain.name, dest)
    assert out["disks"][0]["mode"] == "rescan" and "tracking lost" in out["disks"][0]["reason"], err
    assert domain.checkpoints() == ["vimgtools.gen-2"]
    out, err = replicate_json(domain.name, dest)
    assert out["disks"][0]["mode"] == "incremental", err


def test_define_the_clone(domain: Domain, tmp_path: Path, libvirtd: str) -> None:
    dest = tmp_path / "dr"
    _, err = replicate_json("--define", libvirtd, domain.name, dest, check=2)  # its own name: the guest's
    assert "not a clone of vimgtools" in err and "--as" in err and not dest.exists()
    clone = guests.DOMAIN_PREFIX + "clone"
    out, err = replicate_json("--define", libvirtd, "--as", clone, domain.name, dest)
    assert out["defined"] == clone, err
    dom = domain.conn.lookupByName(clone)
    assert not dom.isActive() and dom.UUIDString() != domain.dom.UUIDString()
    xml = dom.XMLDesc(0)
    assert f"{dest}/vda.img" in xml and "vimg:clone" in xml
    uuid = dom.UUIDString()
    out, _ = replicate_json("--define", libvirtd, "--as", clone, domain.name, dest)  # redefined in place
    assert domain.conn.lookupByName(clone).UUIDString() == uuid and out["generation"] == 2


def test_running_domain_over_ssh_and_its_clone_defined(
    domain: Domain, tmp_path: Path, libvirtd: str, sshd: list[str]
) -> None:
    """DEST on the DR host (here: the same libvirtd, reached through it): the pull-mode backup pushed
    over ssh, domain.xml written there, the clone defined from it."""
    dest = tmp_path / "dr"
    remote = f"root@127.0.0.1:{dest}"
    clone = guests.DOMAIN_PREFIX + "clone"
    out, err = replicate_json(*sshd, "--define", libvirtd, "--as", clone, domain.name, remote)
    assert out["defined"] == clone and out["generation"] == 1, err
    assert f"{dest}/vda.img" in (dest / "domain.xml").read_text()
    xml = domain.conn.lookupByName(clone).XMLDesc(0)
    assert f"{dest}/vda.img" in xml and f"{dest}/vdb.img" in xml and "vimg:clone" in xml
    said = domain.qmp(  # through the running QEMU's own device: its bitmap marks the write
        "human-monitor-command",
        **{
            "command-line": 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x66 12M 4k"'
        },
    )
    assert not said.strip(), said  # (qemu-io prints to QEMU's stdout; errors come back here)
    out, err = replicate_json(*sshd, domain.name, remote)
    vda, vdb = out["disks"]
    assert vda["mode"] == "incremental" and vda["changed"] == 1 and vda["bytes_sent"] < 64 * 1024, err
    assert vdb["mode"] == "rescan"  # raw: no bitmap, compared in full
    assert json.loads((dest / "manifest.json").read_text())["generation"] == 2
