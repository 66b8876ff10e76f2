"""The replica directory, here (``LocalDir``) or on the DR host over ssh (``RemoteDir``).

A run asks the same of both: ``prepare`` (made if missing, put back to the generation its
manifest says after a run that died writing it, and what it holds: the manifest and each
replica file's identity, and the undo area of the generation to be written made), ``sync``
(one disk, through sync's engine: ``sync_from`` here, ``push_from`` over ssh with the dirty
bitmap's extents compared at both ends), ``commit`` (``domain.xml``, then the manifest with the
replicas' identities, atomically, then the undo area dropped) and ``recover``.

Over ssh each of ``prepare``, ``commit`` and ``recover`` is one short session with
``python3 -m vimgtools.replicate --server`` on the DR host (sync's wire frames: HELLO with the
operation, RESULT or ERROR), doing there exactly what ``LocalDir`` does here; each disk is one
sync session (``python3 -m vimgtools.sync --server``). No session is held open while a disk is
copied, so a first run of a large disk cannot time another one out. Where ``rsh`` is OpenSSH,
the sessions of a run share one connection (``ControlMaster``, a socket of this run's own,
closed at the end): ssh's handshake once a run, not once a session (~0.3 s each here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from vimgtools.errors import InvalidInput, JournalError, TransportError, VimgError
from vimgtools.image import Image, fsync_dir
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.domain import DOMAIN_XML, clone_xml
from vimgtools.sync.chunks import Extents
from vimgtools.sync.local import sync_from
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.remote import push_from
from vimgtools.sync.result import SyncResult
from vimgtools.sync.ssh import Peer, split_remote
from vimgtools.sync.undo import rollback
from vimgtools.sync.wire import HELLO, RESULT, WIRE_MAGIC, WIRE_VERSION, Channel, recv_hello, send_error

log = logging.getLogger("vimgtools.replicate")

UNDO_DIR = mf.UNDO_DIR
UNDO_GENERATION = "generation"  # in UNDO_DIR: which generation they undo
Identity = dict[str, int]
Progress = Callable[[int, int], None]


def replica_identity(path: Path) -> Identity:
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Prepared(NamedTuple):
    prev: mf.Manifest | None  # the manifest DEST holds (None: a new DEST)
    identities: dict[str, Identity]  # of each replica file there now
    undo: str | None  # where the next generation's undo files go (their names appended); None: nothing
    # to protect (a new DEST) or a dry run


class ReplicaDir(Protocol):
    where: str  # DEST as given
    remote: bool

    def prepare(self, dry_run: bool) -> Prepared:
        """Made if missing (not in a dry run), put back to its manifest's generation, and the undo area
        of the next generation made (one session over ssh)."""
        ...

    def sync(
        self, img: Image, file: str, opts: SyncOptions, progress: Progress | None,
        stop: threading.Event | None, regions: Extents | None,
    ) -> SyncResult: ...  # fmt: skip

    def commit(self, manifest: mf.Manifest, domain_xml: str | None) -> str | None:
        """``domain.xml`` (from the guest's, disks at the replicas), then the manifest with each replica's
        identity; returns the domain.xml written."""
        ...

    def recover(self, dry_run: bool) -> list[str]: ...

    def close(self) -> None: ...


def open_dest(dest: str | os.PathLike[str], opts: SyncOptions) -> ReplicaDir:
    """``[USER@]HOST:DIR`` (sync's remote syntax: ``opts.rsh``, ``remote_python``, ``timeout``) or a directory."""
    host, path = split_remote(os.fspath(dest))
    if host is not None:
        return RemoteDir(host, path, opts)
    return LocalDir(Path(dest))


# -- here ------------------------------------------------------------------------------------
class LocalDir:
    remote = False

    def __init__(self, path: Path) -> None:
        self.path, self.where = path, str(path)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def prepare(self, dry_run: bool) -> Prepared:
        if not self.path.is_dir():
            if not self.path.parent.is_dir():
                raise InvalidInput(f"{self.path}: directory {self.path.parent} does not exist")
            if dry_run:  # compared against replicas that do not exist yet, written nowhere
                self._scratch = tempfile.TemporaryDirectory(prefix="vimg-replicate-")
                return Prepared(None, {}, None)
            self.path.mkdir()
        prev = mf.load(self.path)
        if not dry_run:
            restore(self.path, prev)
        found = {}
        for d in prev.disks if prev else []:
            with contextlib.suppress(FileNotFoundError):
                found[d.file] = replica_identity(self.path / d.file)
        return Prepared(prev, found, self._begin(prev.generation + 1) if prev and not dry_run else None)

    def _begin(self, generation: int) -> str:
        """A generation to protect: each disk's old blocks kept until commit (restore uses them)."""
        undo = self.path / UNDO_DIR
        undo.mkdir(exist_ok=True)
        mf.write_atomic(undo / UNDO_GENERATION, f"{generation}\n")
        return str(undo)

    def _dir(self) -> Path:
        return Path(self._scratch.name) if self._scratch else self.path

    def sync(
        self, img: Image, file: str, opts: SyncOptions, progress: Progress | None,
        stop: threading.Event | None, regions: Extents | None,
    ) -> SyncResult:  # fmt: skip
        return sync_from(img, self._dir() / file, opts, progress=progress, stop=stop, regions=regions)

    def commit(self, manifest: mf.Manifest, domain_xml: str | None) -> str | None:
        return commit(self.path, manifest, domain_xml)

    def recover(self, dry_run: bool) -> list[str]:
        if not self.path.is_dir():
            raise InvalidInput(f"{self.path}: no such replica directory")
        return restore(self.path, mf.load(self.path), dry_run=dry_run)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()


def commit(dest: Path, manifest: mf.Manifest, domain_xml: str | None) -> str | None:
    """Generation N of DEST committed: its definition, then its manifest, then its undo area dropped."""
    xml = None
    if domain_xml is not None:  # before the manifest: a committed generation always has its definition
        fmts = {d.target: (dest.resolve() / d.file, d.format) for d in manifest.disks}
        xml = clone_xml(domain_xml, fmts)
        mf.write_atomic(dest / DOMAIN_XML, xml)
    for d in manifest.disks:  # what the next run checks the replica against
        d.replica = replica_identity(dest / d.file)
    mf.save(dest, manifest)
    if (dest / UNDO_DIR).is_dir():  # committed: nothing to undo any more
        shutil.rmtree(dest / UNDO_DIR)
        fsync_dir(dest)
    return xml


def restore(dest: Path, prev: mf.Manifest | None, *, dry_run: bool = False) -> list[str]:
    """Put every disk of DEST back to the generation its manifest says, after a run that died
    after writing some of them (its undo files are there and its manifest was never committed).
    Returns the replica files put back. With ``dry_run`` nothing is written."""
    undo = dest / UNDO_DIR
    if not undo.is_dir():
        return []
    try:
        writing = int((undo / UNDO_GENERATION).read_text())
    except (OSError, ValueError):
        writing = -1  # the run died before it wrote a single disk
    restored: list[str] = []
    if prev is None or writing > prev.generation:
        for u in sorted(undo.glob("*.undo")):
            replica = dest / u.stem
            if not replica.exists():
                continue
            try:
                if not dry_run:
                    rollback(replica, u)
            except JournalError as e:  # its sync never reached writing in place: nothing to put back
                log.debug("%s: %s", u, e)
                continue
            restored.append(replica.name)
            old = next((d for d in prev.disks if d.file == replica.name), None) if prev else None
            if old is not None and old.replica and not dry_run:
                # Exactly the content the manifest's generation had (rollback checks it): its identity
                # too, so that the next run can still be incremental.
                os.utime(replica, ns=(time.time_ns(), old.replica["mtime_ns"]))
            log.warning(
                "%s: back to generation %s (the run that wrote it did not finish)",
                replica, prev.generation if prev else 0,
            )  # fmt: skip
    if not dry_run:
        shutil.rmtree(undo)
        fsync_dir(dest)
    return restored


# -- over ssh ----------------------------------------------------------------------------------
class RemoteDir:
    """DEST on the DR host: each directory operation one session with its ``--server``."""

    remote = True

    def __init__(self, host: str, path: str, opts: SyncOptions) -> None:
        self.host, self.path = host, path
        self.where = f"{host}:{path}"
        self._control: str | None = None
        argv = shlex.split(opts.rsh)
        if argv and os.path.basename(argv[0]) == "ssh":  # options the user gave come first and win
            # /tmp, not $TMPDIR: a socket's path has room for 108 bytes, less ssh's 17 of a temporary name
            self._control = f"/tmp/vimgtools-ssh-{os.getpid()}-{os.urandom(4).hex()}"
            opts = opts.replace(
                rsh=f"{opts.rsh} -o ControlMaster=auto -o ControlPath={self._control} -o ControlPersist=10",
            )  # idle 10 s, it goes: a gap between sessions longer costs a handshake, a killed run's goes soon
        self.opts = opts
        # A dry run into a DEST still to be made: compared here, against replicas that do not exist.
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        o = self.opts
        peer = Peer.start(self.host, o.rsh, o.remote_python, o.timeout, module="vimgtools.replicate")
        try:
            ch = peer.channel
            ch.send_json(HELLO, {"magic": WIRE_MAGIC.decode(), "version": WIRE_VERSION, "op": op,
                                 "path": self.path, **args})  # fmt: skip
            _, reply = ch.recv_json(RESULT)
            return reply
        except TransportError as e:
            raise peer.explain(e) from e
        finally:
            peer.close()

    def prepare(self, dry_run: bool) -> Prepared:
        r = self._call("prepare", dry_run=dry_run)
        if r.get("missing"):
            self._scratch = tempfile.TemporaryDirectory(prefix="vimg-replicate-")
            return Prepared(None, {}, None)
        prev = None if r.get("manifest") is None else mf.from_json(r["manifest"], self.where)
        undo = r.get("undo")
        if prev is not None and not dry_run and not isinstance(undo, str):
            raise TransportError(
                f"{self.host}: its vimgtools made no undo area (an older version? update it)"
            )
        return Prepared(prev, {str(k): v for k, v in (r.get("identities") or {}).items()}, undo)

    def sync(
        self, img: Image, file: str, opts: SyncOptions, progress: Progress | None,
        stop: threading.Event | None, regions: Extents | None,
    ) -> SyncResult:  # fmt: skip
        if self._scratch is not None:
            return sync_from(
                img, Path(self._scratch.name) / file, opts, progress=progress, stop=stop, regions=regions
            )
        target = f"{self.host}:{self.path.rstrip('/')}/{file}"
        opts = opts.replace(rsh=self.opts.rsh)  # this run's shared connection
        return push_from(img, target, opts, progress=progress, stop=stop, regions=regions)

    def commit(self, manifest: mf.Manifest, domain_xml: str | None) -> str | None:
        r = self._call("commit", manifest=manifest.to_json(), domain_xml=domain_xml)
        return None if r.get("domain_xml") is None else str(r["domain_xml"])

    def recover(self, dry_run: bool) -> list[str]:
        return [str(x) for x in self._call("recover", dry_run=dry_run)["restored"]]

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
        if self._control is not None and os.path.exists(self._control):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*shlex.split(self.opts.rsh), "-O", "exit", self.host], capture_output=True, timeout=30
                )


def serve(rfd: int = 0, wfd: int = 1, timeout: float = 300.0) -> int:
    """The DR host's end of ``RemoteDir``: one operation on stdin/stdout. Returns the exit code."""
    ch = Channel(rfd, wfd, peer="client", timeout=timeout)
    try:
        msg = recv_hello(ch)
        ch.send_json(RESULT, _serve(msg))
        return 0
    except VimgError as e:
        send_error(ch, e)
        return e.exit_code
    except Exception as e:
        send_error(ch, e)
        return 1


def _serve(msg: dict[str, Any]) -> dict[str, Any]:
    path, op = Path(str(msg.get("path") or "")), msg.get("op")
    if not str(path) or str(path) == ".":
        raise InvalidInput("no replica directory given")
    here = LocalDir(path)
    if op == "prepare":
        dry_run = msg.get("dry_run") is True
        if dry_run and not path.is_dir():
            if not path.parent.is_dir():
                raise InvalidInput(f"{path}: directory {path.parent} does not exist")
            return {"missing": True}
        prev, identities, undo = here.prepare(dry_run)
        return {"manifest": prev.to_json() if prev else None, "identities": identities, "undo": undo}
    if op == "commit":
        manifest = mf.from_json(msg.get("manifest"), "client")
        xml = msg.get("domain_xml")
        return {"domain_xml": commit(path, manifest, xml if isinstance(xml, str) else None)}
    if op == "recover":
        return {"restored": here.recover(msg.get("dry_run") is True)}
    raise TransportError(f"unknown operation {op!r}")
