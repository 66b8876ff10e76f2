"""Child processes that do not outlive us: qemu, qemu-storage-daemon.

``die_with_parent(signum)`` is a ``preexec_fn`` for ``subprocess.Popen``: the kernel sends the
child ``signum`` when the thread that started it dies (``PR_SET_PDEATHSIG``), SIGKILL of
vimgtools included. Start such children from a thread that lives as long as they are needed
(the main thread, in the CLIs).

References: prctl(2) PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# The C library Python itself runs on, through dlopen(NULL): ctypes.util.find_library("c") ran
# `ldconfig -p` in a child process (and imported shutil, tempfile, bz2, lzma) at every start.
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(signum: int) -> Callable[[], None]:
    """A preexec function: ``signum`` to this child when the thread that started it dies."""
    parent = os.getpid()
    prctl = _libc.prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
