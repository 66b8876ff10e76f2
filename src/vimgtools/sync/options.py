"""What a sync is asked to do: one frozen, validated options object for every mode and both ends.

``SyncOptions`` is checked once, when it is made; the far side of a remote sync gets
the part it acts on (``for_peer``) inside HELLO and rebuilds it (``from_peer``).
Errors name the option as the library knows it (``block_size``); the CLI words it as
its flag (``--block-size``).
"""

from __future__ import annotations

import os
from typing import Any

from vimgtools.errors import InvalidInput
from vimgtools.formats import check_format_name
from vimgtools.sync.chunks import CHUNK_SIZE
from vimgtools.sync.digests import CHECKSUMS

MIN_BLOCK_SIZE = 4096


class SyncOptions:
    """Options of ``sync()``; the same object drives a local run, a push, a pull and the far side.

    Attributes:
        block_size: comparison unit in bytes (power of two, 4 KiB to 8 MiB).
        dry_run: read and report; write nothing.
        verify: afterwards, read the replica back (on its own host) and compare it with SRC.
        undo: keep the old content of every overwritten block in this file (see ``rollback``).
        allow_shrink: let a larger replica file be cut to SRC's size.
        force: write a replica that a running QEMU holds open.
        journal: redo journal path (default: ``DST.vimg-journal``; for devices under /var/lib/vimgtools).
        keep_cache: keep the pages this run brought into the page cache.
        state: keep SRC's digests in this file; the next run then reads SRC alone.
        workers: reader threads on each end.
        checksum: block digest where the images are not side by side: ``"xxh128"`` (seeded per
            session) or ``"blake2b"`` (keyed).
        rsh: remote only: the command that reaches the host, split like a shell would.
        remote_python: remote only: the Python that runs ``-m vimgtools.sync --server`` there.
        timeout: remote only: seconds of silence from the far side before giving up.
        src_format, dst_format: the images' formats (``qcow2``, ``raw``, ...), never probed when
            given; None: by the rule in ``vimgtools.formats``.
    """

    block_size: int
    dry_run: bool
    verify: bool
    undo: str | None
    allow_shrink: bool
    force: bool
    journal: str | None
    keep_cache: bool
    state: str | None
    workers: int
    checksum: str
    rsh: str
    remote_python: str
    timeout: float
    src_format: str | None
    dst_format: str | None

    # A plain class, not a dataclass: the sync CLI's start-up imports no dataclasses (issue 14).
    # The options the far side acts on (the rest is this side's business).
    PEER_FIELDS = (
        "dry_run",
        "verify",
        "undo",
        "allow_shrink",
        "force",
        "journal",
        "keep_cache",
        "workers",
        "src_format",
        "dst_format",
    )

    def __init__(
        self,
        *,
        block_size: int = 4096,
        dry_run: bool = False,
        verify: bool = False,
        undo: str | os.PathLike[str] | None = None,
        allow_shrink: bool = False,
        force: bool = False,
        journal: str | os.PathLike[str] | None = None,
        keep_cache: bool = False,
        state: str | os.PathLike[str] | None = None,
        workers: int = 2,
        checksum: str = "xxh128",
        rsh: str = "ssh",
        remote_python: str = "python3",
        timeout: float = 300.0,
        src_format: str | None = None,
        dst_format: str | None = None,
    ) -> None:
        check_block_size(block_size)
        check_checksum(checksum)
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise InvalidInput(f"{workers!r}: use 1 to 64 reader threads", option="workers")
        if not timeout > 0:
            raise InvalidInput(f"{timeout!r}: must be more than 0 seconds", option="timeout")
        for name, value in (("src_format", src_format), ("dst_format", dst_format)):
            if value is not None:
                check_format_name(value, name)
        self.__dict__.update(  # __setattr__ refuses; in the order above (as_dict, repr)
            block_size=block_size, dry_run=dry_run, verify=verify, undo=_path(undo), allow_shrink=allow_shrink,
            force=force, journal=_path(journal), keep_cache=keep_cache, state=_path(state), workers=workers,
            checksum=checksum, rsh=rsh, remote_python=remote_python, timeout=timeout, src_format=src_format,
            dst_format=dst_format,
        )  # fmt: skip

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SyncOptions are frozen: use .replace({name}=...)")

    def replace(self, **changes: Any) -> SyncOptions:
        """A copy with ``changes``, validated again."""
        return SyncOptions(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SyncOptions) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    def __repr__(self) -> str:
        return f"SyncOptions({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def for_peer(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PEER_FIELDS}

    @classmethod
    def from_peer(cls, obj: object, *, block_size: int, checksum: str) -> SyncOptions:
        """The far side's options from HELLO; unknown keys are ignored, bad values refused."""
        given = obj if isinstance(obj, dict) else {}
        kw: dict[str, Any] = {}
        for k in cls.PEER_FIELDS:
            if k not in given:
                continue
            v = given[k]
            if k in ("undo", "journal", "src_format", "dst_format"):
                kw[k] = None if v is None else str(v)
            elif k == "workers":
                kw[k] = v
            else:
                kw[k] = bool(v)
        return cls(block_size=block_size, checksum=checksum, **kw)


def check_block_size(block_size: int) -> None:
    """A power of two from 4 KiB to 8 MiB: a block never spans two chunks."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise InvalidInput(f"{block_size!r} is not a number of bytes", option="block_size")
    if not (MIN_BLOCK_SIZE <= block_size <= CHUNK_SIZE and block_size & (block_size - 1) == 0):
        raise InvalidInput(
            f"{block_size} is not a power of two from {MIN_BLOCK_SIZE} (4 KiB) to {CHUNK_SIZE} (8 MiB)",
            option="block_size",
        )


def check_checksum(checksum: str) -> None:
    if checksum not in CHECKSUMS:
        raise InvalidInput(f"{checksum!r}: known are {', '.join(CHECKSUMS)}", option="checksum")


def _path(value: str | os.PathLike[str] | None) -> str | None:
    """A path as given (PathLike too), kept as str."""
    return None if value is None else os.fspath(value)
