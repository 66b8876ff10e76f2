"""A shut-off guest: its images read directly, only what their dirty bitmaps marked.

Each run's tracking is a persistent dirty bitmap ``vimgtools.gen-N`` started in every qcow2
(``qemu-img bitmap --add``) before it is read: the guest is off, so the images do not change
while they are copied, and the next time it runs QEMU records its writes there. A raw image
keeps no bitmap: every run compares it in full.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vimgtools.errors import ImageRefused, InvalidInput
from vimgtools.formats import add_bitmap, inspect, remove_bitmap
from vimgtools.image import Image
from vimgtools.images import open_image
from vimgtools.replicate import manifest as mf
from vimgtools.replicate.generation import GuestDisk


def target_name(i: int) -> str:
    """The guest's name of its i-th virtio disk: vda, vdb, ..."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else f"vd{i}"


class Offline:
    """The backend for a shut-off guest given as its images, in the guest's order."""

    def __init__(
        self,
        images: Sequence[str | os.PathLike[str]],
        name: str | None = None,
        *,
        track: bool = True,
        targets: Sequence[str] | None = None,
    ) -> None:
        """``track=False``: start no bitmap and remove none (a libvirt domain's bitmaps are its
        checkpoints', which only libvirt may change): each disk is read since the last generation's
        bitmap when it is still there, and that bitmap stays this generation's tracking."""
        if not images:
            raise InvalidInput("no images given")
        self.paths = [Path(i).resolve() for i in images]
        self.name = name or Path(images[0]).stem
        self.track = track
        self.uuid: str | None = None
        self.xml: str | None = None  # a shut-off libvirt domain's definition
        for p in self.paths:
            with Image(p) as img:  # refuses what is missing or not an image, before anything is made
                if img.qemu_lock():
                    raise ImageRefused(
                        f"{p}: a running VM (QEMU) holds it: replicate a running guest by its libvirt "
                        "name or qmp:SOCKET (one consistent moment of all its disks), or shut it off"
                    )
        names = list(targets) if targets else [target_name(i) for i in range(len(self.paths))]
        self._targets = dict(zip(names, self.paths, strict=True))

    def disks(self) -> list[GuestDisk]:
        out = []
        for target, p in self._targets.items():
            info = inspect(p, None)
            size = info.virtual_size
            if size < 0:  # raw: qemu-img was not asked
                with Image(p) as img:
                    size = img.size
            ours = {b.name: b.consistent for b in info.bitmaps if b.name.startswith(mf.BITMAP_PREFIX)}
            out.append(GuestDisk(target, str(p), info.format, size, ours if info.format == "qcow2" else None))
        return out

    def warnings(self) -> list[str]:
        return []

    def domain_xml(self) -> str | None:
        return self.xml

    @contextlib.contextmanager
    def moment(self, bitmap: str, since: dict[str, str | None], dry_run: bool) -> Iterator[_Images]:
        if not dry_run and self.track:
            for p in self.paths:
                info = inspect(p, None)
                if info.format != "qcow2":
                    continue
                if any(b.name == bitmap for b in info.bitmaps):  # left by a run that failed: afresh
                    remove_bitmap(p, bitmap)
                add_bitmap(p, bitmap)  # before the disk is read: the next generation's tracking
        yield _Images(self._targets, since, self.track)


@dataclass
class _Images:
    """The images themselves are the moment: the guest is off."""

    targets: dict[str, Path]
    since: dict[str, str | None]
    track: bool
    consistency: str = "offline"
    freeze_seconds: float = 0.0
    lost: dict[str, str] = field(default_factory=dict)

    def open(self, target: str) -> Image:
        return open_image(self.targets[target], bitmap=self.since.get(target))

    def tracking(self, target: str, bitmap: str) -> str | None:
        if not self.track:
            return self.since.get(target)
        return bitmap if inspect(self.targets[target], None).format == "qcow2" else None

    def commit(self, bitmap: str) -> None:
        if not self.track:
            return
        for p in self.targets.values():
            for b in inspect(p, None).bitmaps:
                if b.name.startswith(mf.BITMAP_PREFIX) and b.name != bitmap:
                    remove_bitmap(p, b.name)
