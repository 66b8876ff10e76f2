"""What a sync did: ``SyncResult``, the figures every mode fills and ``--json`` prints."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from vimgtools.blocks import Run
from vimgtools.image import Image
from vimgtools.sync.replica import REPLICA_FIGURES

log = logging.getLogger("vimgtools.sync")


@dataclass
class SyncResult:
    """What a sync did. ``to_dict()`` is the ``--json`` summary."""

    src: str
    dst: str
    block_size: int
    size: int = 0
    blocks: int = 0
    changed: int = 0  # blocks whose content differed
    zero: int = 0  # of those, blocks now all zero: punched (files) or zeroed (devices)
    bytes_read: int = 0  # from the image(s) on this host; with a remote peer, its reads are added
    bytes_written: int = 0  # into dst itself (punched holes count 0)
    journal_bytes: int = 0  # written to the redo journal
    undo_bytes: int = 0  # written to the undo file
    seconds: float = 0.0
    seconds_flush: float = 0.0  # of those, committing, writing in place and fsyncing (the rest is comparing)
    dry_run: bool = False
    created: bool = False  # dst did not exist
    resized_from: int | None = None  # dst's old size when it was resized
    resumed_from: int = 0  # an interrupted run's scan position this run started at
    recovered: bool = False  # a committed journal from an interrupted run was replayed first
    dst_extra_bytes: int = 0  # a block device dst larger than src: this tail was left alone
    verified: bool | None = None
    warnings: list[str] = field(default_factory=list)
    bytes_sent: int | None = None  # remote sync only: bytes this side wrote to / read from the pipe
    bytes_received: int | None = None
    seconds_connect: float | None = None  # remote sync only: starting the far side (ssh) until it answered
    state: str | None = (
        None  # --state: "trusted" (SRC alone was read), "none yet", "replica changed since", ...
    )
    src_format: str = "raw"  # how SRC was read (vimgtools.formats)
    dst_format: str = "raw"
    src_chain: list[dict[str, str]] = field(default_factory=list)  # SRC, then its backing files

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
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
