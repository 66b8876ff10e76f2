"""A libvirt domain (``--connect URI``): libvirt's checkpoints and pull-mode backups.

The moment is ``virDomainBackupBegin`` in pull mode with a new checkpoint
``vimgtools.gen-N``: libvirt takes the snapshot of every disk and starts the checkpoint's
bitmaps in one QMP transaction, then serves each disk at that moment over NBD on a unix
socket (export = the disk's target), with ``qemu:dirty-bitmap:backup-<target>`` for a
disk read incrementally since the last generation's checkpoint (libvirt merges the
chain). The filesystems are frozen through the guest agent (``virDomainFSFreeze``)
around ``backupBegin``, with the watchdog of ``freeze``.

When the checkpoints and the bitmaps in the images have drifted apart (QEMU killed,
a transient domain destroyed: "checkpoint inconsistent"), our checkpoints are deleted,
leaf first, the metadata alone where the bitmap is gone (never ``--children``: it left
libvirtd 9.0 inconsistent here), and every disk is compared in full from a fresh backup.

A shut-off domain is read as its images (``offline``), named and identified by libvirt.

References: libvirt formatbackup.html, formatcheckpoint.html, kbase/live_full_disk_backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from vimgtools.bindings import BindingsMissing, load_libvirt
from vimgtools.errors import ImageError, InvalidInput, VimgError
from vimgtools.formats import ImageInfo
from vimgtools.image import Image
from vimgtools.nbd import NbdImage, ServedExport, load_ahead
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.freeze import NoFreeze, frozen
from vimgtools.replicate.generation import GuestDisk

log = logging.getLogger("vimgtools.replicate")

JOB_END_TIMEOUT = 30.0
WORK_DIR = "/var/tmp"  # our per-run directories: the backup's socket and scratch files


class LibvirtError(VimgError):
    """libvirt refused or failed a call."""


def libvirt_module() -> ModuleType:
    try:
        return load_libvirt()
    except BindingsMissing as e:
        raise InvalidInput(str(e)) from None


def connect(uri: str) -> Any:
    lv = libvirt_module()
    lv.registerErrorHandler(lambda *_: None, None)  # errors come as exceptions, not on stderr too
    try:
        return lv.open(uri)
    except lv.libvirtError as e:
        raise InvalidInput(
            f"{uri}: cannot connect to libvirt (is libvirtd running? GUEST names a libvirt domain "
            f"unless it is qmp:PATH or an existing image): {e.get_error_message()}"
        ) from None


def lookup(conn: Any, name: str) -> Any:
    lv = libvirt_module()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as e:
        raise InvalidInput(
            f"{name}: no such libvirt domain at {conn.getURI()}: {e.get_error_message()}"
        ) from None


def domain_disks(xml: str) -> list[tuple[str, str, str]]:
    """(target, source file, format) of each disk (CD-ROMs and floppies left out), in the guest's order."""
    out = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        src = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        path = None if src is None else (src.get("file") or src.get("dev"))
        if target is None or path is None:
            continue
        out.append((target.get("dev", ""), path, driver.get("type", "raw") if driver is not None else "raw"))
    return out


class DomainFreezer:
    def __init__(self, dom: Any, uri: str) -> None:
        self.dom, self.uri = dom, uri

    def freeze(self) -> int:
        lv = libvirt_module()
        try:
            n: int = self.dom.fsFreeze()
            return n
        except lv.libvirtError as e:
            raise NoFreeze(f"the guest agent cannot freeze: {e.get_error_message()}") from None

    def thaw(self) -> int:
        n: int = self.dom.fsThaw()
        return n

    def watchdog_argv(self) -> list[str]:
        return ["--libvirt", self.uri, self.dom.name()]


class LibvirtGuest:
    """The backend for a running libvirt domain."""

    def __init__(self, dom: Any, uri: str) -> None:
        self.lv = libvirt_module()
        self.dom, self.uri = dom, uri
        self.name: str = dom.name()
        self.uuid: str | None = dom.UUIDString()
        self._warnings: list[str] = []
        xml = dom.XMLDesc(0)
        self._disks = domain_disks(xml)
        self._qemu_ids = _dac_ids(xml)

    def warnings(self) -> list[str]:
        return self._warnings

    def _ours(self) -> list[str]:
        """Our checkpoints, oldest first (libvirt lists them parents first with TOPOLOGICAL)."""
        flags = getattr(self.lv, "VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL", 0)
        return [
            c.getName()
            for c in self.dom.listAllCheckpoints(flags)
            if c.getName().startswith(mf.BITMAP_PREFIX)
        ]

    def disks(self) -> list[GuestDisk]:
        ours = self._ours()
        out = []
        for target, path, fmt in self._disks:
            size = self.dom.blockInfo(target)[0]
            out.append(
                GuestDisk(target, path, fmt, size, dict.fromkeys(ours, True) if fmt == "qcow2" else None)
            )
        return out

    def _abort_ours(self) -> None:
        """A backup job a killed run of ours left (its socket is in a directory named after us)."""
        try:
            xml = self.dom.backupGetXMLDesc()
        except self.lv.libvirtError:
            return  # no backup job
        if "vimgtools-" in xml:
            log.info("%s: ending the backup job a killed run left", self.name)
            with contextlib.suppress(self.lv.libvirtError):
                self.dom.abortJob()

    def _sweep(self) -> None:
        """Work directories of killed runs (their backup job is ended by now): named with their pid."""
        for d in Path(WORK_DIR).glob(f"vimgtools-{self.name}-*"):
            pid = d.name[len(f"vimgtools-{self.name}-") :].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)

    def _delete(self, name: str) -> None:
        """Delete one checkpoint of ours; its metadata alone when its bitmap is gone."""
        try:
            chk = self.dom.checkpointLookupByName(name)
        except self.lv.libvirtError:
            return
        try:
            chk.delete(0)
        except self.lv.libvirtError as e:
            log.warning(
                "%s: checkpoint %s: %s; removing its metadata only", self.name, name, e.get_error_message()
            )
            chk.delete(self.lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

    @contextlib.contextmanager
    def moment(self, bitmap: str, since: dict[str, str | None], dry_run: bool) -> Iterator[_Moment]:
        load_ahead()  # libnbd's bindings, while libvirt takes the moment: the export needs them after
        self._abort_ours()
        if (
            not dry_run and bitmap in self._ours()
        ):  # a run that failed made it: its changes merge into the last
            self._delete(bitmap)
        self._sweep()
        work = Path(tempfile.mkdtemp(prefix=f"vimgtools-{self.name}-{os.getpid()}-", dir=WORK_DIR))
        if self._qemu_ids is not None:  # QEMU makes the socket and the scratch files there
            os.chown(work, *self._qemu_ids)
        m = _Moment(self, work / f"vimgtools-{os.urandom(4).hex()}.sock")
        try:
            try:
                self._begin(m, work, bitmap, since, dry_run)
            except self.lv.libvirtError as e:
                if e.get_error_code() != getattr(self.lv, "VIR_ERR_CHECKPOINT_INCONSISTENT", -1):
                    raise LibvirtError(
                        f"{self.name}: cannot begin the backup: {e.get_error_message()}"
                    ) from None
                why = f"tracking lost: libvirt says {e.get_error_message()}"
                log.warning(
                    "%s: %s; deleting our checkpoints and comparing every disk in full", self.name, why
                )
                for name in reversed(self._ours()):
                    self._delete(name)
                m.lost = {t: why for t, s in since.items() if s}
                self._begin(m, work, bitmap, dict.fromkeys(since), dry_run)
            yield m
        finally:
            m.end()
            shutil.rmtree(work, ignore_errors=True)

    def _begin(
        self, m: _Moment, work: Path, bitmap: str, since: dict[str, str | None], dry_run: bool
    ) -> None:
        backup = ET.Element("domainbackup", mode="pull")
        ET.SubElement(backup, "server", transport="unix", socket=str(m.socket))
        disks = ET.SubElement(backup, "disks")
        chk = ET.Element("domaincheckpoint")
        ET.SubElement(chk, "name").text = bitmap
        chk_disks = ET.SubElement(chk, "disks")
        for target, _, fmt in self._disks:
            last = since.get(target)
            d = ET.SubElement(disks, "disk", name=target, backup="yes", type="file")
            if last:
                d.set("backupmode", "incremental")
                d.set("incremental", last)
            else:
                d.set("backupmode", "full")
            ET.SubElement(d, "scratch", file=str(work / f"{target}.scratch.qcow2"))
            ET.SubElement(chk_disks, "disk", name=target, checkpoint="bitmap" if fmt == "qcow2" else "no")
        m.incremental = {t for t, s in since.items() if s}
        freezer = DomainFreezer(self.dom, self.uri)
        with frozen(freezer, self.name) as f:
            self.dom.backupBegin(
                ET.tostring(backup, "unicode"), None if dry_run else ET.tostring(chk, "unicode"), 0
            )
        m.begun = True
        m.consistency, m.freeze_seconds = f.consistency, f.seconds
        if f.why_not:
            self._warnings.append(f"the moment is crash-consistent only: {f.why_not}")
            log.warning("%s: warning: the moment is crash-consistent only: %s", self.name, f.why_not)

    def domain_xml(self) -> str:
        flags = getattr(self.lv, "VIR_DOMAIN_XML_INACTIVE", 2) | getattr(self.lv, "VIR_DOMAIN_XML_SECURE", 1)
        text: str = self.dom.XMLDesc(flags)
        return text


def _dac_ids(xml: str) -> tuple[int, int] | None:
    """The uid:gid QEMU runs as (the live XML's DAC label, "+64055:+107"), or None."""
    for label in ET.fromstring(xml).findall("./seclabel[@model='dac']/label"):
        with contextlib.suppress(ValueError, AttributeError):
            uid, gid = (int(x.lstrip("+")) for x in (label.text or "").split(":"))
            return uid, gid
    return None


class _Moment:
    def __init__(self, guest: LibvirtGuest, socket: Path) -> None:
        self.guest = guest
        self.socket = socket
        self.begun = False
        self.incremental: set[str] = set()
        self.consistency = "crash"
        self.freeze_seconds = 0.0
        self.lost: dict[str, str] = {}

    def open(self, target: str) -> Image:
        path, fmt = next((p, f) for t, p, f in self.guest._disks if t == target)
        served = ServedExport(
            str(self.socket), target, bitmap=f"backup-{target}" if target in self.incremental else None
        )
        try:
            return NbdImage(ImageInfo(Path(path), fmt, self.guest.dom.blockInfo(target)[0]), served=served)
        except ImageError as e:
            raise ImageError(f"{self.guest.name}: {target}: {e}") from e

    def tracking(self, target: str, bitmap: str) -> str | None:
        fmt = next(f for t, _, f in self.guest._disks if t == target)
        return bitmap if fmt == "qcow2" else None

    def commit(self, bitmap: str) -> None:
        for name in self.guest._ours():
            if name != bitmap:
                self.guest._delete(name)

    def end(self) -> None:
        """End the pull backup (``abortJob``: "Operation canceled" is its normal end) and wait until
        libvirt has: a job still there would make the next run's backupBegin fail."""
        if not self.begun:
            return
        lv, dom = self.guest.lv, self.guest.dom
        deadline = time.monotonic() + JOB_END_TIMEOUT
        while True:
            try:
                dom.abortJob()
            except lv.libvirtError as e:
                log.debug("%s: abortJob: %s", self.guest.name, e.get_error_message())
            try:
                dom.backupGetXMLDesc()
            except lv.libvirtError:
                break  # no backup job any more
            if time.monotonic() > deadline:
                log.warning(
                    "%s: warning: libvirt's backup job is still there; the next run ends it", self.guest.name
                )
                break
            time.sleep(0.2)
        self.begun = False
