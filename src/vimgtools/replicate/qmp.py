"""A running QEMU reached through its QMP socket (``qmp:PATH``), and its guest agent (``--agent PATH``).

The moment, for all disks in one QMP ``transaction`` (the guest's I/O drained for it):
for every disk with a qcow2 image, ``block-dirty-bitmap-add`` of the next generation's
persistent bitmap (or, left by a run that failed, ``block-dirty-bitmap-clear`` of it); for an
incremental disk a disabled, non-persistent copy of the last generation's bitmap
(``vimgtools.export``: ``add`` + ``merge``) frozen at the moment; and ``blockdev-backup
sync=none`` into a scratch qcow2 backed by the disk, so that reading the scratch node gives the
disk as it was at the moment while the guest goes on writing (the old contents of what it
overwrites are copied there first). Our generation bitmaps stay enabled: one of a run that
fails still covers everything since, and the next run reads from it.

The scratch nodes are exported by QEMU's own NBD server on an abstract unix socket, the
frozen copy with them (``qemu:dirty-bitmap:vimgtools.export``), and read with libnbd. The
scratch files are unlinked as soon as QEMU has them open: nothing is left on disk whatever
happens to us; what a killed run leaves inside QEMU (export, job, node, bitmap copy) the next
run removes first (``_clean``).

References: QEMU QMP reference (``transaction``, ``blockdev-backup``, ``block-dirty-bitmap-*``,
``nbd-server-start``, ``block-export-add``), docs/interop/bitmaps.rst, the guest agent protocol
(``guest-fsfreeze-freeze``/``-thaw``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vimgtools.errors import ImageError, InvalidInput, VimgError
from vimgtools.formats import ImageInfo, create
from vimgtools.image import Image
from vimgtools.nbd import NbdImage, ServedExport, load_ahead
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.freeze import NoFreeze, frozen
from vimgtools.replicate.generation import GuestDisk
from vimgtools.replicate.offline import target_name

log = logging.getLogger("vimgtools.replicate")

TIMEOUT = 60.0
EXPORT_BITMAP = "vimgtools.export"  # the last generation's bitmap, frozen at the moment
SCRATCH = "vimgtools-scratch-"  # node names of our scratch images, and their files' names
SCRATCH_DIR = "/var/tmp"
JOB = "vimgtools-"  # job and export ids


class QmpError(VimgError):
    """QEMU refused a QMP command, or its monitor went away."""


class Qmp:
    """A synchronous QMP client on ``path`` (QEMU's own library); ``negotiate=False`` for an agent."""

    def __init__(self, path: str, *, negotiate: bool = True, what: str = "QMP") -> None:
        self.path, self.what = path, what
        if not os.path.exists(path):
            raise InvalidInput(f"{path}: no such {what} socket")
        self._q = QEMUMonitorProtocol(path)
        self._q.settimeout(TIMEOUT)
        try:
            self._q.connect(negotiate=negotiate)
        except (QMPError, OSError) as e:
            raise InvalidInput(f"{path}: cannot reach {what}: {e or type(e).__name__}") from None

    def __call__(self, cmd: str, **args: Any) -> Any:
        try:
            return self._q.cmd(cmd, **args)
        except (QMPError, OSError, EOFError, TimeoutError) as e:
            raise QmpError(f"{self.path}: {cmd}: {e or type(e).__name__}") from e

    def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            self._q.close()


class AgentFreezer:
    """qemu-guest-agent on its socket (``--agent PATH``: the host side of its virtio-serial port)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._agent: Qmp | None = None

    def _connect(self) -> Qmp:
        if self._agent is None:
            try:
                self._agent = Qmp(self.path, negotiate=False, what="the guest agent")
            except InvalidInput as e:
                raise NoFreeze(str(e)) from None
        return self._agent

    def freeze(self) -> int:
        agent = self._connect()
        try:
            agent("guest-ping")
        except QmpError as e:
            raise NoFreeze(f"the guest agent does not answer: {e}") from None
        n: int = agent("guest-fsfreeze-freeze")
        return n

    def thaw(self) -> int:
        n: int = self._connect()("guest-fsfreeze-thaw")
        return n

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def watchdog_argv(self) -> list[str]:
        return ["--agent", self.path]


@dataclass
class _Disk:
    target: str
    node: str  # the block node the guest's device sits on (its format node)
    file: str
    format: str
    size: int
    cluster: int
    bitmaps: dict[str, bool] = field(default_factory=dict)


class QmpGuest:
    """The backend for a QEMU started without libvirt: ``QmpGuest("/run/qemu/mail.qmp", agent=...)``."""

    def __init__(self, path: str, *, agent: str | None = None, name: str | None = None) -> None:
        self.qmp = Qmp(path)
        self.agent = agent
        self.uuid: str | None = None
        try:
            self.uuid = self.qmp("query-uuid").get("UUID")
            if self.uuid and not self.uuid.strip("0-"):  # QEMU without -uuid
                self.uuid = None
            qname = self.qmp("query-name").get("name")
        except QmpError:
            qname = None
        self.name = name or qname or Path(path).stem
        self._warnings: list[str] = []
        self._disks: list[_Disk] = []
        self._clean()  # a killed run's backup job sits between the device and its disk: first away with it
        self._disks = self._find_disks()

    def close(self) -> None:
        self.qmp.close()

    def warnings(self) -> list[str]:
        return self._warnings

    def domain_xml(self) -> str | None:
        return None  # a QEMU without libvirt has no definition to clone

    def _find_disks(self) -> list[_Disk]:
        nodes = {n["node-name"]: n for n in self.qmp("query-named-block-nodes", flat=True)}
        out: list[_Disk] = []
        for dev in self.qmp("query-block"):
            ins = dev.get("inserted")
            if not ins or "tray_open" in dev:  # CD-ROMs (they have trays) and empty drives are not replicated
                continue
            m = re.search(r"/machine/peripheral/([^/]+)/", dev.get("qdev", ""))
            target = m.group(1) if m else (dev.get("device") or target_name(len(out)))
            node = ins["node-name"]
            image = ins.get("image", {})
            bitmaps = {
                b["name"]: not b.get("inconsistent", False)
                for b in nodes.get(node, {}).get("dirty-bitmaps", [])
                if b.get("name", "").startswith(mf.BITMAP_PREFIX)
            }
            out.append(
                _Disk(
                    target, node, ins["file"], ins["drv"], image.get("virtual-size", 0),
                    image.get("cluster-size", 0), bitmaps,
                )
            )  # fmt: skip
        return out

    def disks(self) -> list[GuestDisk]:
        return [
            GuestDisk(d.target, d.file, d.format, d.size, d.bitmaps if d.format == "qcow2" else None)
            for d in self._disks
        ]

    def _clean(self, *, inconsistent: bool = False) -> None:
        """What a killed run of ours left inside QEMU: exports, jobs, scratch nodes, frozen copies;
        with ``inconsistent``, our bitmaps QEMU found inconsistent too (not in a dry run)."""
        for e in self.qmp("query-block-exports"):
            if e["id"].startswith(JOB):
                with contextlib.suppress(QmpError):
                    self.qmp("block-export-del", id=e["id"], mode="hard")
        for j in self.qmp("query-block-jobs"):
            if j["device"].startswith(JOB):
                with contextlib.suppress(QmpError):
                    self.qmp("block-job-cancel", device=j["device"], force=True)
        self._wait_jobs_gone()
        for n in self.qmp("query-named-block-nodes", flat=True):
            if n["node-name"].startswith(SCRATCH):
                with contextlib.suppress(QmpError):
                    self.qmp("blockdev-del", **{"node-name": n["node-name"]})
        for d in self._disks:
            with contextlib.suppress(QmpError):
                self.qmp("block-dirty-bitmap-remove", node=d.node, name=EXPORT_BITMAP)
        for d in self._disks if inconsistent else []:  # QEMU was killed: only removing them is allowed
            for name, ok in list(d.bitmaps.items()):
                if not ok:
                    log.warning("%s: %s: removing the inconsistent bitmap %s", self.name, d.target, name)
                    self.qmp("block-dirty-bitmap-remove", node=d.node, name=name)
                    del d.bitmaps[name]

    def _wait_jobs_gone(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while any(j["device"].startswith(JOB) for j in self.qmp("query-block-jobs")):
            if time.monotonic() > deadline:
                raise QmpError(f"{self.qmp.path}: our backup jobs do not end")
            time.sleep(0.05)

    @contextlib.contextmanager
    def moment(self, bitmap: str, since: dict[str, str | None], dry_run: bool) -> Iterator[_Moment]:
        load_ahead()  # libnbd's bindings, while QEMU takes the moment: the export needs them after
        self._clean(inconsistent=not dry_run)
        socket_name = f"vimgtools-{os.getpid()}-{os.urandom(6).hex()}"
        m = _Moment(self, socket_name, since)
        try:
            actions = []
            for d in self._disks:
                self._scratch(d)
                tracked = d.format == "qcow2"
                if tracked and not dry_run:
                    if bitmap in d.bitmaps:  # a run that failed started it: start it again now
                        actions.append(_act("block-dirty-bitmap-clear", node=d.node, name=bitmap))
                    else:
                        actions.append(
                            _act("block-dirty-bitmap-add", node=d.node, name=bitmap, persistent=True)
                        )
                last = since.get(d.target)
                if last:
                    actions.append(
                        _act(
                            "block-dirty-bitmap-add",
                            node=d.node,
                            name=EXPORT_BITMAP,
                            persistent=False,
                            disabled=True,
                        )
                    )
                    actions.append(
                        _act("block-dirty-bitmap-merge", node=d.node, target=EXPORT_BITMAP, bitmaps=[last])
                    )
                actions.append(
                    _act(
                        "blockdev-backup", **{"job-id": JOB + d.target, "device": d.node,
                        "target": SCRATCH + d.target, "sync": "none", "auto-dismiss": True}
                    )
                )  # fmt: skip
            freezer = AgentFreezer(self.agent) if self.agent else None
            try:
                with frozen(freezer, self.name) as f:
                    self.qmp("transaction", actions=actions)
            finally:
                if freezer is not None:
                    freezer.close()
            m.consistency, m.freeze_seconds = f.consistency, f.seconds
            if f.why_not:
                self._warnings.append(f"the moment is crash-consistent only: {f.why_not}")
                log.warning("%s: warning: the moment is crash-consistent only: %s", self.name, f.why_not)
            self._start_server(socket_name)
            m.server = True
            for d in self._disks:
                args: dict[str, Any] = {"node-name": SCRATCH + d.target}
                if since.get(d.target):
                    args["bitmaps"] = [EXPORT_BITMAP]
                self.qmp(
                    "block-export-add", type="nbd", id=JOB + d.target, name=d.target, writable=False, **args
                )
            yield m
        finally:
            m.end()

    def _start_server(self, socket_name: str) -> None:
        addr = {"type": "unix", "data": {"path": socket_name, "abstract": True}}
        try:
            self.qmp("nbd-server-start", addr=addr)
        except QmpError as e:
            if "already running" not in str(e):
                raise
            others = [x["id"] for x in self.qmp("query-block-exports")]
            if others:
                raise QmpError(
                    f"{self.qmp.path}: QEMU's NBD server is in use by someone else (exports {', '.join(others)})"
                ) from None
            # One without exports: ours, left by a killed run (QEMU cannot say whose it is).
            log.info("%s: stopping the NBD server a killed run left", self.name)
            self.qmp("nbd-server-stop")
            self.qmp("nbd-server-start", addr=addr)

    def _scratch(self, d: _Disk) -> None:
        """A scratch qcow2 for the disk's overwritten blocks, opened by QEMU then unlinked. Its name
        carries our pid: what a run killed in between left, a later run removes (``_sweep``)."""
        _sweep()
        fd, path = tempfile.mkstemp(
            prefix=f"{SCRATCH}{os.getpid()}-{d.target}-", suffix=".qcow2", dir=SCRATCH_DIR
        )
        os.close(fd)
        try:
            create(Path(path), "qcow2", d.size, d.cluster)
            self.qmp(
                "blockdev-add",
                **{"driver": "qcow2", "node-name": SCRATCH + d.target, "backing": d.node,
                   "file": {"driver": "file", "filename": path}},
            )  # fmt: skip
        finally:
            os.unlink(path)


def _sweep() -> None:
    """Scratch files of runs that died between making one and QEMU opening it."""
    for f in Path(SCRATCH_DIR).glob(f"{SCRATCH}*.qcow2"):
        pid = f.name[len(SCRATCH) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                f.unlink()


def _act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


class _Moment:
    def __init__(self, guest: QmpGuest, socket_name: str, since: dict[str, str | None]) -> None:
        self.guest = guest
        self.socket_name = socket_name
        self.since = since
        self.server = False
        self.consistency = "crash"
        self.freeze_seconds = 0.0
        self.lost: dict[str, str] = {}

    def open(self, target: str) -> Image:
        d = next(x for x in self.guest._disks if x.target == target)
        info = ImageInfo(Path(d.file), d.format, d.size, d.cluster)
        served = ServedExport(
            "\0" + self.socket_name, target, bitmap=EXPORT_BITMAP if self.since.get(target) else None
        )
        try:
            return NbdImage(info, served=served)
        except ImageError as e:
            raise ImageError(f"{self.guest.name}: {target}: {e}") from e

    def tracking(self, target: str, bitmap: str) -> str | None:
        d = next(x for x in self.guest._disks if x.target == target)
        return bitmap if d.format == "qcow2" else None

    def commit(self, bitmap: str) -> None:
        nodes = {n["node-name"]: n for n in self.guest.qmp("query-named-block-nodes", flat=True)}
        for d in self.guest._disks:
            for bm in nodes.get(d.node, {}).get("dirty-bitmaps", []):
                name = bm.get("name", "")
                if name.startswith(mf.BITMAP_PREFIX) and name != bitmap:
                    self.guest.qmp("block-dirty-bitmap-remove", node=d.node, name=name)

    def end(self) -> None:
        """Exports, server, jobs and scratch nodes gone; the frozen copies removed."""
        q = self.guest.qmp
        with contextlib.suppress(QmpError):
            for d in self.guest._disks:
                with contextlib.suppress(QmpError):
                    q("block-export-del", id=JOB + d.target, mode="hard")
            if self.server:
                with contextlib.suppress(QmpError):
                    q("nbd-server-stop")
            self.guest._clean()
