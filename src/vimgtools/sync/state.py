"""--state: remember SRC's digests so that the next run finds its changes by reading SRC alone.

Safe while nothing but vimgtools writes the replica between runs. The state records
what the replica looked like right after the sync (device, inode, size, mtime and
the host's boot id); a later run trusts the stored digests only if the replica
still looks exactly so, and otherwise compares in full (and writes a fresh state).
A block device's mtime does not change when it is written, so for devices only a
replaced device is detected: there the state relies on the admin.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from vimgtools.errors import InvalidInput, JournalError
from vimgtools.image import Image
from vimgtools.sync.digests import Digests, digest_stream
from vimgtools.sync.sender import Session
from vimgtools.sync.signature import STATE_MAGIC, Signature, SignatureWriter

log = logging.getLogger("vimgtools.sync")


class StateRun:
    """The state of the last run (if usable) and the writer of this run's."""

    def __init__(self, path: str, block_size: int, checksum: str, size: int) -> None:
        self.path = Path(path)
        self.old: Signature | None = None
        self.note = "none yet"
        key = os.urandom(32)
        if self.path.exists():
            try:
                old = Signature(self.path, STATE_MAGIC)
                old.verify()
            except (JournalError, InvalidInput) as e:
                log.warning("warning: %s; comparing in full this time", e)
                self.note = "unreadable"
            else:
                if old.block_size != block_size:
                    log.warning(
                        "warning: %s: made with %d-byte blocks; comparing in full", self.path, old.block_size
                    )
                    self.note = "other block size"
                    old.close()
                else:
                    self.old, key, checksum = old, old.key, old.checksum
        self.key, self.checksum = key, checksum
        self.writer = SignatureWriter(
            self.path, magic=STATE_MAGIC, block_size=block_size, checksum=checksum, key=key, size=size
        )

    def trusted(self, ok: bool) -> Callable[[int, int], Digests] | None:
        """The stored digests as the other side's, if the replica was found as the state says."""
        if self.old is None:
            return None
        self.note = "trusted" if ok else "replica changed since"
        if not ok:
            log.info("%s: the replica changed since this state was written; comparing in full", self.path)
            return None
        return self.old.digests

    def prepass(self, img: Image, sess: Session, keep_cache: bool, trusted: bool) -> int:
        """A resumed run starts past 0, but the new state needs every chunk. Returns bytes read."""
        read = 0
        for offset, length, mine, _, n in digest_stream(
            img, 0, sess.start, sess.block_size, self.checksum, self.key,
            keep_cache=keep_cache, workers=sess.workers,
        ):  # fmt: skip
            read += n
            self.writer.add(offset, mine)
            if trusted and self.old is not None:
                self.old.digests(offset, length)
        return read

    def close(self) -> None:
        if self.old is not None:
            self.old.close()
