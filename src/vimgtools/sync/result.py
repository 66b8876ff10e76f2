"""What a sync did: ``SyncResult``, the figures every mode fills and ``--json`` prints."""

from __future__ import annotations

import logging

from vimgtools.blocks import Run
from vimgtools.image import Image
from vimgtools.sync.replica import REPLICA_FIGURES

log = logging.getLogger("vimgtools.sync")


class SyncResult:
    """What a sync did. ``to_dict()`` is the ``--json`` summary, its keys in this order."""

    def __init__(self, src: str, dst: str, block_size: int, *, dry_run: bool = False) -> None:
        self.src = src
        self.dst = dst
        self.block_size = block_size
        self.size = 0
        self.blocks = 0
        self.changed = 0  # blocks whose content differed
        self.zero = 0  # of those, blocks now all zero: punched (files) or zeroed (devices)
        self.bytes_read = 0  # from the image(s) on this host; with a remote peer, its reads are added
        self.bytes_written = 0  # into dst itself (punched holes count 0)
        self.journal_bytes = 0  # written to the redo journal
        self.undo_bytes = 0  # written to the undo file
        self.seconds = 0.0
        self.seconds_flush = (
            0.0  # of those, committing, writing in place and fsyncing (the rest is comparing)
        )
        self.dry_run = dry_run
        self.created = False  # dst did not exist
        self.resized_from: int | None = None  # dst's old size when it was resized
        self.resumed_from = 0  # an interrupted run's scan position this run started at
        self.recovered = False  # a committed journal from an interrupted run was replayed first
        self.dst_extra_bytes = 0  # a block device dst larger than src: this tail was left alone
        self.verified: bool | None = None
        self.warnings: list[str] = []
        self.bytes_sent: int | None = None  # remote sync only: bytes this side wrote to / read from the pipe
        self.bytes_received: int | None = None
        self.seconds_connect: float | None = (
            None  # remote sync only: starting the far side (ssh) until it answered
        )
        self.state: str | None = (
            None  # --state: "trusted" (SRC alone was read), "none yet", "replica changed since", ...
        )
        self.src_format = "raw"  # how SRC was read (vimgtools.formats)
        self.dst_format = "raw"
        self.src_chain: list[dict[str, str]] = []  # SRC, then its backing files

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = dict(vars(self))
        d["seconds"] = round(self.seconds, 3)
        d["seconds_flush"] = round(self.seconds_flush, 3)
        if self.bytes_sent is None:
            del d["bytes_sent"], d["bytes_received"], d["seconds_connect"]
        elif self.seconds_connect is not None:
            d["seconds_connect"] = round(self.seconds_connect, 3)
        if self.state is None:
            del d["state"]
        return d

    def count(self, runs: list[Run]) -> None:
        for b0, b1, zero in runs:
            self.changed += b1 - b0
            if zero:
                self.zero += b1 - b0

    def take_replica(self, figures: dict[str, object]) -> None:
        """The receiving end's figures (``Replica.figures()``, here or from the far side's RESULT)."""
        for key in REPLICA_FIGURES:
            value = figures.get(key)
            if key == "resized_from":
                self.resized_from = value if isinstance(value, int) and value >= 0 else None
            elif key in ("created", "recovered"):
                setattr(self, key, bool(value))
            elif key == "seconds_flush":
                self.seconds_flush = float(value) if isinstance(value, (int, float)) else 0.0
            elif key == "dst_format":
                self.dst_format = str(value) if isinstance(value, str) else "raw"
            else:
                setattr(self, key, value if isinstance(value, int) and value >= 0 else 0)


def take_source(res: SyncResult, s: Image) -> None:
    """SRC's size, format and backing chain into the result; warn when a running VM writes it."""
    res.size, res.blocks = s.size, -(-s.size // res.block_size)
    res.src_format, res.src_chain = s.format, s.chain
    if len(s.chain) > 1 or s.format != "raw":
        log.debug("%s: read as %s: %s", s.path, s.format, " <- ".join(c["filename"] for c in s.chain))
    if s.qemu_lock() == "writer":
        msg = (
            f"{s.path}: a running VM has it open for writing; the copy is only crash-consistent "
            "(snapshot the VM first, see docs/sync.md)"
        )
        log.warning("warning: %s", msg)
        res.warnings.append(msg)
