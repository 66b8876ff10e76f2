"""The guest's filesystems frozen for the moment of a snapshot, and thawed even if we die.

``frozen(freezer)`` freezes through the guest agent, yields, and thaws in a ``finally``. Before
freezing it starts a watchdog: a separate process (its own session, so a Ctrl-C of ours does
not reach it) that holds the read end of a pipe whose write end only we hold. We tell it
"thawed" when we have thawed; if the pipe closes first — vimgtools killed, even by SIGKILL —
it thaws the guest itself (``watchdog.py``, run as a file: up in milliseconds).

A guest without an agent (or whose agent does not answer) gives no freeze: the moment is
crash-consistent, and the run says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("vimgtools.replicate")

FREEZE_TIMEOUT = 60.0  # fsfreeze waits for writeback: generous, but never forever
HOLD_ENV = "VIMGTOOLS_TEST_HOLD_FROZEN"  # tests: stay frozen this many seconds (to kill us there)


class Freezer(Protocol):
    def freeze(self) -> int:
        """Freeze the guest's filesystems; how many. Raises NoFreeze when there is no agent."""
        ...

    def thaw(self) -> int:
        """Thaw them; how many were frozen."""
        ...

    def watchdog_argv(self) -> list[str]:
        """What the watchdog needs to thaw this guest by itself (its command-line arguments)."""
        ...


class NoFreeze(Exception):
    """The guest cannot be frozen (no agent channel, or the agent does not answer)."""


@dataclass
class Freeze:
    consistency: str = "crash"
    seconds: float = 0.0
    why_not: str | None = None  # why the moment is only crash-consistent


@contextlib.contextmanager
def frozen(freezer: Freezer | None, guest: str) -> Iterator[Freeze]:
    """Yield with the guest's filesystems frozen when it can be (``Freeze.consistency`` says)."""
    state = Freeze()
    if freezer is None:
        state.why_not = "no guest agent given"
        yield state
        return
    dog = _watchdog(freezer)
    t0 = time.monotonic()
    try:
        try:
            n = freezer.freeze()
        except NoFreeze as e:
            state.why_not = str(e)
            yield state
            return
        t_frozen = time.monotonic()
        log.info("%s: %d filesystems frozen in %.3f s (the guest's writeback)", guest, n, t_frozen - t0)
        state.consistency = "application"
        hold = float(os.environ.get(HOLD_ENV, "0") or 0)
        if hold:
            time.sleep(hold)
        try:
            yield state
        finally:
            thawed = freezer.thaw()
            state.seconds = time.monotonic() - t0
            if thawed == 0 and n > 0:  # the watchdog or someone else thawed before we did
                state.consistency = "crash"
                state.why_not = "the guest was thawed before the snapshot was complete"
            log.info(
                "%s: thawed after %.3f s in all (%.3f s of them for the snapshot)",
                guest, state.seconds, time.monotonic() - t_frozen,
            )  # fmt: skip
    finally:
        _dismiss(dog)


def _watchdog(freezer: Freezer) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")), *freezer.watchdog_argv()],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # our terminal's signals are not its
    )


_dismissed: list[subprocess.Popen[bytes]] = []  # told "thawed", not reaped yet (reap_watchdogs)


def _dismiss(dog: subprocess.Popen[bytes]) -> None:
    """Tell the watchdog we thawed. Not waited for here: it may still be starting (~50 ms of a
    Python start-up, inside the run's time); ``reap_watchdogs`` waits when the run is done."""
    assert dog.stdin is not None
    with contextlib.suppress(OSError):
        dog.stdin.write(b"thawed\n")
        dog.stdin.close()
    _dismissed.append(dog)


def reap_watchdogs() -> None:
    """Wait for the watchdogs told "thawed" (long gone by the end of a run: no zombie left behind)."""
    while _dismissed:
        dog = _dismissed.pop()
        try:
            dog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            dog.kill()
            dog.wait()
