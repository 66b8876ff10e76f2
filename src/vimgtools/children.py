"""Child processes that do not outlive us: qemu, qemu-storage-daemon.

``die_with_parent(signum)`` is a ``preexec_fn`` for ``subprocess.Popen``: the kernel sends the
child ``signum`` when the thread that started it dies (``PR_SET_PDEATHSIG``), SIGKILL of
vimgtools included. Start such children from a thread that lives as long as they are needed
(the main thread, in the CLIs).

References: prctl(2) PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vimgtools import _linux


def die_with_parent(signum: int) -> Callable[[], None]:
    """A preexec function: ``signum`` to this child when the thread that started it dies."""
    parent = os.getpid()
    set_signal = _linux.set_parent_death_signal

    def preexec() -> None:
        set_signal(signum)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
