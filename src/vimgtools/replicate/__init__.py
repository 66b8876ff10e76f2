"""Replicate a guest into a replica directory that always holds one whole generation.

``replicate(images, dest)``: a shut-off guest's images, read directly, incrementally through
persistent dirty bitmaps (``offline``); ``manifest`` is the directory's ``manifest.json``.
``python -m vimgtools.replicate`` is the CLI. Running guests (libvirt, QMP) are not built yet.
"""

from __future__ import annotations

from vimgtools.replicate.offline import DiskResult, ReplicateResult
from vimgtools.replicate.offline import replicate_offline as replicate

__all__ = ["DiskResult", "ReplicateResult", "replicate"]
