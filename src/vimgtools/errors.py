"""Every exception vimgtools raises on purpose.

VimgError               base; catch this to catch everything            exit 1
├── InvalidInput        the caller's fault: bad path, block size, option exit 2 (also a ValueError)
├── ImageError          the image: unreadable, short, sizes differ, full  exit 1
│   └── ImageRefused    refused before any write: same file, held by QEMU exit 2
├── JournalError        a journal/undo file: corrupt, foreign, unreadable exit 1
├── TransportError      the sync peer: gone, or speaks another wire version exit 1
├── GuestError          libguestfs: launch, inspect, mount, write-back     exit 1
├── KernelError         the --from tree: no kernel, modules do not match   exit 2
├── BootloaderError     unknown loader, cannot restamp here, restamp failed exit 2
├── DrillError          drill: qemu would not start, its monitor went away exit 1
├── BootCheckFailed     rekernel --boot-check: the new kernel did not boot exit 1
└── Interrupted         SIGINT/SIGTERM: stopped at a consistent point      exit 130

Library code raises these; the CLIs print ``prog: error: <message>`` and exit
with the class's ``exit_code`` (DESIGN.md: 2 = refused before any change,
1 = failed with the target as it was or recoverable as documented).

Every class has a ``result`` attribute, None unless the call that gave up set it
to what it had decided and done so far (a ``Report``: rekernel's ``Result``), so
that ``--json`` still prints one object on failure.
"""

from __future__ import annotations

from typing import Any, Protocol


class Report(Protocol):
    """What a library call decided and did, as the ``--json`` object."""

    def to_dict(self) -> dict[str, Any]: ...


class VimgError(Exception):
    """Base of every error vimgtools raises on purpose."""

    exit_code = 1
    #: What the failed call had decided and done (set once, where the call gives up); None: nothing.
    result: Report | None = None


class InvalidInput(VimgError, ValueError):
    """The caller's fault: a bad path, block size or option. Nothing was changed.

    ``option`` names the library option at fault (``block_size``), if one is; the message
    then reads ``block_size: <reason>`` and a CLI words it as its flag (``--block-size``).
    """

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(f"{option}: {message}" if option else message)
        self.option, self.reason = option, message


class ImageError(VimgError):
    """An image could not be read or written as needed."""


class ImageRefused(ImageError):
    """An image was refused before anything was written (same file, in use, too small)."""

    exit_code = 2


class JournalError(VimgError):
    """A journal, undo or state file is corrupt, foreign or unreadable."""


class TransportError(VimgError):
    """The sync peer went away or speaks another protocol."""


class GuestError(VimgError):
    """libguestfs failed: launch, inspection, mount or write-back."""


class KernelError(VimgError):
    """The kernel tree given with --from is unusable."""

    exit_code = 2


class BootloaderError(VimgError):
    """The guest's bootloader cannot be restamped."""

    exit_code = 2


class DrillError(VimgError):
    """qemu could not run a drill: it would not start, or its monitor went away.

    A guest that does not boot is not an error: it is the drill's answer (a report, exit 1).
    """


class BootCheckFailed(VimgError):
    """rekernel --boot-check: the changed guest did not boot its new kernel; DISK was not written.

    ``report`` is the drill's ``DrillReport`` (the CLI prints it).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class Interrupted(VimgError):
    """Stopped by a signal at a consistent point; the message says how to resume."""

    exit_code = 130
