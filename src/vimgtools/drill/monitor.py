"""QMP and the guest agent, through QEMU's own client library (``qemu.qmp``): the only import of it.

``Monitor`` drives the qemu the drill started (start the paused guest, ACPI power button, screen
dump, read guest memory, quit); ``Agent`` talks to qemu-guest-agent in the guest over its
virtio-serial port (the same JSON protocol without greeting or negotiation, as QEMU's own
``qemu-ga-client`` does). Errors become :class:`DrillError`.

References: QEMU's QMP reference (``cont``, ``system_powerdown``, ``screendump``, ``pmemsave``,
``quit``) and the guest agent protocol reference (``guest-ping``, ``guest-get-osinfo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from vimgtools.errors import DrillError

log = logging.getLogger("vimgtools.drill")

_BANNER = re.compile(rb"Linux version (\d[\w.+~-]*) \(")
WINDOW = 64 << 20


class Monitor:
    """QMP on qemu's control socket."""

    def __init__(self) -> None:
        self._qmp = QMPClient("vimg-drill")

    async def connect(self, path: Path, *, alive: Any, timeout: float = 30.0) -> None:
        """Connect once qemu listens; ``alive()`` false means qemu died (stop trying)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not path.exists():  # qemu makes the socket while it starts
            if not alive() or loop.time() > deadline:
                raise DrillError(f"qemu never opened its monitor socket {path}")
            await asyncio.sleep(0.05)
        while True:
            try:
                await self._qmp.connect(str(path))
                return
            except QMPError as e:
                if not alive() or loop.time() > deadline:
                    raise DrillError(f"cannot reach qemu's monitor at {path}: {e}") from e
                await asyncio.sleep(0.05)

    async def execute(self, cmd: str, args: dict[str, object] | None = None, timeout: float = 60.0) -> Any:
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as e:
            raise DrillError(f"qemu monitor: {cmd}: {e or type(e).__name__}") from e

    async def start(self) -> None:
        await self.execute("cont")

    async def powerdown(self) -> None:
        """Press the ACPI power button."""
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        await self.execute("quit", timeout=5)

    async def screendump(self, path: Path) -> None:
        await self.execute("screendump", {"filename": str(path), "format": "png"})

    async def find_kernel_banner(self, memory_bytes: int, scratch: Path) -> str | None:
        """The running kernel's version, read from guest memory: its ``Linux version`` banner.

        For a guest whose console is quiet (``quiet`` on the kernel command line prints no banner):
        the decompressed kernel's banner and its log buffer are in RAM whatever the log level. A
        boot loader holds only the compressed image, so a banner in memory means the kernel ran.
        Read 64 MiB windows (``pmemsave``) until one holds it, the guest paused (QMP ``stop``) meanwhile.
        """
        counts: dict[str, int] = {}
        await self.execute("stop")  # a guest powering itself off meanwhile would take its memory along
        try:
            for start in range(0, memory_bytes, WINDOW):
                size = min(WINDOW, memory_bytes - start)
                await self.execute("pmemsave", {"val": start, "size": size, "filename": str(scratch)})
                data = scratch.read_bytes()
                for m in _BANNER.finditer(data):
                    v = m.group(1).decode("ascii", "replace")
                    counts[v] = counts.get(v, 0) + 1
                if counts:
                    break
        finally:
            scratch.unlink(missing_ok=True)
            with contextlib.suppress(DrillError):
                await self.execute("cont")
        return max(counts, key=lambda v: counts[v]) if counts else None

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._qmp.disconnect()


class Agent:
    """qemu-guest-agent in the guest. One client for the whole run: late answers to commands that
    timed out carry old ids and are dropped (QMP's rule for unknown ids)."""

    def __init__(self) -> None:
        self._qga = QMPClient("vimg-drill-agent")
        self._qga.await_greeting = False
        self._qga.negotiate = False
        self._connected = False

    async def ask(self, cmd: str, path: Path, timeout: float = 3.0) -> Any:
        """Run ``cmd``; None when the agent does not answer within ``timeout`` (not running yet)."""
        try:
            if not self._connected:
                await asyncio.wait_for(self._qga.connect(str(path)), timeout)
                self._connected = True
            return await asyncio.wait_for(self._qga.execute(cmd), timeout)
        except TimeoutError:
            return None
        except (QMPError, OSError, EOFError):
            await self.close()
            return None

    async def shutdown(self, path: Path) -> None:
        """Ask the agent to power the guest off (it does not answer when it does)."""
        if self._connected:
            try:
                await asyncio.wait_for(self._qga.execute("guest-shutdown", {"mode": "powerdown"}), 2.0)
            except TimeoutError:
                pass  # the usual: no answer while it shuts down
            except (QMPError, OSError, EOFError) as e:
                log.debug("guest-shutdown: %s", e)

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._qga.disconnect()
