"""drill: boot a replica's disks on throw-away overlays and say whether, and how far, they boot.

``boot(disks, ...) -> DrillReport`` is the library entry (``run.py``); ``python -m vimgtools.drill``
the CLI. The stages and how they are recognised are in ``stages.py``; the qemu command line and
process in ``qemu.py``; QMP and the guest agent in ``monitor.py``; the KVM probe in ``accel.py``;
the private directory and overlays in ``workdir.py``. See docs/drill.md.
"""

from __future__ import annotations

from vimgtools.drill.report import DrillReport, render
from vimgtools.drill.run import Options, boot
from vimgtools.drill.stages import Stage

__all__ = ["DrillReport", "Options", "Stage", "boot", "render"]
