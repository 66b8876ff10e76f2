"""Replicate an image by writing only the blocks that changed, crash-safely.

``sync(src, dst)`` compares both images block by block (reading each once, skipping
holes), journals the changed blocks, commits, then writes them in place. Either side
may be ``[user@]host:path``. ``recover(dst)`` finishes an update a crash interrupted;
``rollback(dst, undo)`` returns a replica to the generation before a sync; signatures
and deltas carry a sync through another channel. The modules, by role, are drawn in
docs/architecture.md.
"""

from __future__ import annotations

from vimgtools.sync.delta import DeltaResult, apply_delta, write_delta
from vimgtools.sync.options import SyncOptions
from vimgtools.sync.replica import recover
from vimgtools.sync.result import SyncResult
from vimgtools.sync.run import sync
from vimgtools.sync.signature import SignatureInfo, write_signature
from vimgtools.sync.undo import rollback

__all__ = [
    "DeltaResult",
    "SignatureInfo",
    "SyncOptions",
    "SyncResult",
    "apply_delta",
    "recover",
    "rollback",
    "sync",
    "write_delta",
    "write_signature",
]
