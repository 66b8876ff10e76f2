"""Reaching the far side: ``[user@]host:path`` parsing and the peer process behind ``--rsh``.

The host is one argv element for ssh; paths travel inside the protocol, never on a shell
command line (see ``remote``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from vimgtools.errors import InvalidInput, TransportError
from vimgtools.sync.wire import Channel

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("vimgtools.sync")

_REMOTE = re.compile(r"^(?P<host>(?:[^@/:\s]+@)?(?:\[[^\]/]+\]|[^:/\s\[\]]+)):(?P<path>.*)$")


def split_remote(spec: str) -> tuple[str | None, str]:
    """``[user@]host:path`` -> (host, path); anything else (``./a:b``, ``/x``) is a local path.

    Like rsync: a colon before the first slash makes it remote.
    """
    m = _REMOTE.match(spec)
    if not m or spec.startswith(("/", "./", "../")):
        return None, spec
    host, path = m.group("host"), m.group("path")
    if host.startswith("-") or host.split("@")[-1].startswith("-"):
        raise InvalidInput(f"{spec}: a host name cannot start with '-'")
    if not path:
        raise InvalidInput(f"{spec}: no path after the host name")
    return host, path


class Peer:
    """The far side: a process speaking the protocol on its stdin/stdout."""

    def __init__(self, host: str, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.host, self.proc, self.channel = host, proc, channel
        self.stderr_tail: deque[str] = deque(maxlen=20)

    @classmethod
    def start(
        cls, host: str, rsh: str, remote_python: str, timeout: float, module: str = "vimgtools.sync"
    ) -> Peer:
        """``module``'s ``--server`` on ``host`` (``vimgtools.replicate``'s for a replica directory)."""
        import shlex  # here, with subprocess: a local run starts no process (~5 ms of every start)
        import subprocess

        argv = [*shlex.split(rsh), host, f"{shlex.quote(remote_python)} -m {module} --server"]
        log.debug("starting %s", argv)
        try:
            # Its own session: Ctrl-C is ours to handle, and close() can end all it started.
            pipe = subprocess.PIPE
            proc = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, start_new_session=True)
        except OSError as e:
            raise InvalidInput(f"{rsh!r}: cannot run {argv[0]}: {e.strerror}", option="rsh") from e
        assert proc.stdin is not None and proc.stdout is not None
        peer = cls(host, proc, Channel(proc.stdout.fileno(), proc.stdin.fileno(), peer=host, timeout=timeout))
        threading.Thread(target=peer._drain_stderr, daemon=True).start()
        return peer

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            log.debug("%s: %s", self.host, line)

    def explain(self, e: TransportError) -> TransportError:
        """Add what the far side printed (e.g. "No module named vimgtools") to a transport error."""
        import subprocess  # loaded by start()

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        time.sleep(0.05)
        said = " | ".join(line for line in self.stderr_tail if line)[-500:]
        if "No module named" in said:
            return TransportError(f"{self.host}: vimgtools is not installed for the remote Python ({said})")
        return TransportError(f"{e}{' (remote said: ' + said + ')' if said else ''}")

    def close(self) -> None:
        import subprocess  # loaded by start()

        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it started, too
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
