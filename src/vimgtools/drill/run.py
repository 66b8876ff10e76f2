"""``boot()``: one drill, start to finish.

check the disks -> choose the accelerator -> overlays in a private directory -> qemu, paused ->
QMP ``cont`` (time 0) -> watch the firmware log and the serial console (and the agent) until the
end condition, a failure, the guest stopping, or the timeout -> kernel version from guest memory
if the console was quiet -> screenshot -> ACPI poweroff, forced after the grace period -> overlays
removed, logs kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vimgtools.drill import accel as accel_mod
from vimgtools.drill.monitor import Agent, Monitor
from vimgtools.drill.qemu import ACCELS, BUSES, NETS, OVMF_CODE, QEMU, Machine, Process, argv
from vimgtools.drill.report import NO_SERIAL, DrillReport
from vimgtools.drill.stages import Stage, Watcher
from vimgtools.drill.workdir import Disk, WorkDir, check_disk, replica_disks
from vimgtools.errors import DrillError, ImageRefused, InvalidInput

log = logging.getLogger("vimgtools.drill")

TIMEOUT_TCG = 600.0
TIMEOUT_KVM = 180.0
GRACE = 60.0
POLL = 0.2
# After a failure line, keep reading a little: the rest of the message belongs in the report.
SETTLE = 3.0


@dataclass(frozen=True)
class Options:
    """A drill's settings, checked by ``check()`` before anything starts (InvalidInput names the option)."""

    accel: str | None = None
    memory_mb: int = 1024
    cpus: int = 1
    uefi: bool = False
    net: str = "none"
    bus: str = "virtio"
    timeout: float | None = None
    grace: float = GRACE
    agent: bool = False
    expect: str | None = None
    screenshot: Path | None = None
    log: Path | None = None
    formats: tuple[str | None, ...] = ()
    workdir: Path | None = None
    qemu: str = QEMU

    @property
    def end(self) -> str:
        return "agent" if self.agent else "expect" if self.expect else "login"

    def check(self) -> re.Pattern[str] | None:
        if self.accel not in (None, *ACCELS):
            raise InvalidInput(f"{self.accel!r}: use one of {', '.join(ACCELS)}", option="accel")
        if self.net not in NETS:
            raise InvalidInput(f"{self.net!r}: use one of {', '.join(NETS)}", option="net")
        if self.bus not in BUSES:
            raise InvalidInput(f"{self.bus!r}: use one of {', '.join(BUSES)}", option="bus")
        if not 64 <= self.memory_mb <= 1 << 20:
            raise InvalidInput(f"{self.memory_mb} MiB: give 64 MiB to 1 TiB", option="memory")
        if not 1 <= self.cpus <= 255:
            raise InvalidInput(f"{self.cpus}: give 1 to 255", option="cpus")
        if self.timeout is not None and self.timeout <= 0:
            raise InvalidInput(f"{self.timeout}: must be more than 0 seconds", option="timeout")
        if self.grace < 0:
            raise InvalidInput(f"{self.grace}: must be 0 seconds or more", option="grace")
        if self.agent and self.expect:
            raise InvalidInput("give either --agent or --expect, not both", option="expect")
        if self.uefi and not OVMF_CODE.exists():
            raise InvalidInput(f"{OVMF_CODE} is missing (Debian/Ubuntu: apt-get install ovmf)", option="uefi")
        for name, path in (("screenshot", self.screenshot), ("log", self.log)):
            if path is not None and not Path(path).absolute().parent.is_dir():
                raise InvalidInput(f"{path}: its directory does not exist", option=name)
        if self.expect is None:
            return None
        try:
            return re.compile(self.expect)
        except re.error as e:
            raise InvalidInput(f"{self.expect!r} is not a regular expression: {e}", option="expect") from None


def boot(
    disks: Sequence[str | Path],
    *,
    progress: Callable[[Stage], None] | None = None,
    **options: Any,
) -> DrillReport:
    """Boot ``disks`` (in the order the guest sees them, or one replica directory: its manifest
    names them) on throw-away overlays and report the stages.

    ``options`` are :class:`Options` fields (``accel``, ``memory_mb``, ``cpus``, ``uefi``, ``net``,
    ``bus``, ``timeout``, ``grace``, ``agent``, ``expect``, ``screenshot``, ``log``, ``formats``,
    ``workdir``). ``progress(stage)`` is called as each stage is reached. A guest that does not
    boot is a report with ``booted=False``; bad input raises InvalidInput before anything starts,
    and a qemu that cannot run raises DrillError. The disks are only ever read.
    """
    try:
        opts = Options(**options)
    except TypeError as e:
        raise InvalidInput(str(e)) from None
    pattern = opts.check()
    if not disks:
        raise InvalidInput("no disk given", option="disks")
    if len(opts.formats) > len(disks):
        raise InvalidInput(f"{len(opts.formats)} formats for {len(disks)} disks", option="format")
    checked = [check_disk(d, f) for d, f in replica_disks([Path(d) for d in disks], opts.formats)]
    probe = accel_mod.choose_accel(opts.accel, qemu=opts.qemu)
    if opts.accel is None:
        log.info("accelerator: %s (%s)", probe.accel, probe.reason)
    timeout = opts.timeout or (TIMEOUT_KVM if probe.accel == "kvm" else TIMEOUT_TCG)
    work = WorkDir(opts.workdir)
    keep_dir = opts.log is None
    try:
        run = functools.partial(_drill, checked, opts, pattern, probe.accel, timeout, work, progress)
        report = _run_async(run)
        if opts.accel is None and probe.accel == "tcg":
            report.notes.append(f"TCG, not KVM: {probe.reason}")
        return report
    finally:
        work.close(keep_logs=keep_dir)


async def _drill(
    disks: list[Disk],
    opts: Options,
    pattern: re.Pattern[str] | None,
    accel: str,
    timeout: float,
    work: WorkDir,
    progress: Callable[[Stage], None] | None,
) -> DrillReport:
    serial = Path(opts.log).absolute() if opts.log else work.path / "serial.log"
    serial.unlink(missing_ok=True)
    firmware = work.path / "firmware.log"
    machine = Machine(
        drives=tuple(work.overlay(i, d) for i, d in enumerate(disks)),
        accel=accel,
        memory_mb=opts.memory_mb,
        cpus=opts.cpus,
        uefi=opts.uefi,
        vars_file=work.uefi_vars() if opts.uefi else None,
        net=opts.net,
        bus=opts.bus,
        serial_log=serial,
        firmware_log=firmware,
        qmp_socket=work.socket("qmp.sock"),
        agent_socket=work.socket("qga.sock") if opts.agent else None,
    )
    args = argv(machine, opts.qemu)
    log.debug("$ %s", " ".join(args))
    watcher = Watcher(end=opts.end, expect=pattern, uefi=opts.uefi, on_stage=progress)
    proc = Process(args, stderr_file=work.path / "qemu.log")
    monitor = Monitor()
    agent = Agent() if opts.agent else None
    t0 = time.monotonic()
    stopped = ""
    notes: list[str] = []
    os_info: dict[str, Any] | None = None
    shot: Path | None = None
    try:
        try:
            await monitor.connect(machine.qmp_socket, alive=lambda: proc.poll() is None)
        except DrillError:
            raise _qemu_failed(proc, disks) from None
        await monitor.start()
        t0 = time.monotonic()
        readers = _Tail(firmware), _Tail(serial)
        agent_task: asyncio.Task[dict[str, Any] | None] | None = None
        while True:
            now = time.monotonic() - t0
            watcher.feed_firmware(readers[0].read(), now)
            watcher.feed_serial(readers[1].read(), now)
            if watcher.ended:
                break
            if watcher.failure is not None and now - (watcher.failure_seconds or now) >= SETTLE:
                break
            if proc.poll() is not None:
                stopped = "exited"
                await asyncio.sleep(POLL)  # the last bytes qemu wrote
                watcher.feed_firmware(readers[0].read(), now)
                watcher.feed_serial(readers[1].read(), now)
                if not watcher.ended and watcher.failure is None:
                    code = proc.poll()
                    watcher.fail(f"the guest stopped (qemu exited {code}: powered off or reset)", now)
                break
            if now > timeout:
                watcher.fail(f"timed out after {timeout:.0f} s", now)
                break
            if agent is not None and (agent_task is None or agent_task.done()):
                if agent_task is not None and (got := agent_task.result()) is not None:
                    os_info = got
                    release = str(got.get("kernel-release") or "") or None
                    if release:
                        watcher.set_kernel(release, None, "guest agent")
                    watcher.mark(
                        "agent", now, f"{got.get('pretty-name') or got.get('name') or 'agent answered'}"
                    )
                    break
                agent_task = asyncio.ensure_future(_ask_agent(agent, machine.agent_socket))
            await asyncio.sleep(POLL)
        if agent_task is not None and not agent_task.done():
            agent_task.cancel()
        seconds = time.monotonic() - t0
        alive = proc.poll() is None
        if alive and watcher.kernel is None and watcher.reached("bootloader"):
            await _kernel_from_memory(monitor, watcher, opts, work)
        if alive and opts.screenshot is not None:
            shot = Path(opts.screenshot).absolute()
            try:
                await monitor.screendump(shot)
            except DrillError as e:
                notes.append(f"no screenshot: {e}")
                shot = None
        if alive:
            stopped = await _power_off(
                monitor, proc, opts.grace, agent if os_info is not None else None, machine
            )
            if stopped == "forced":
                asked = "the agent's guest-shutdown" if os_info is not None else "the ACPI button"
                notes.append(f"the guest did not power off within {opts.grace:.0f} s of {asked}: killed")
    finally:
        if agent is not None:
            await agent.close()
        await monitor.close()
        proc.kill()
    if watcher.serial_bytes == 0:
        notes.insert(0, NO_SERIAL)
    booted = watcher.ended and watcher.failure is None
    return DrillReport(
        booted=booted,
        kernel=watcher.kernel,
        stages=watcher.ordered(),
        accel=accel,
        seconds=seconds,
        log=serial,
        last_lines=[] if booted else watcher.last_lines(20),
        reason=None if booted else (watcher.failure or "did not reach the end"),
        failed_stage=None if booted else watcher.first_missing(),
        end=opts.end,
        notes=notes,
        os_info=os_info,
        screenshot=shot,
        firmware_log=firmware,
        stopped=stopped,
    )


def _run_async(make: Callable[[], Coroutine[Any, Any, DrillReport]]) -> DrillReport:
    """``asyncio.run``, or in a thread of its own when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class _Tail:
    """New bytes of a file qemu appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return b""
        self.pos += len(data)
        return data


async def _ask_agent(agent: Agent, path: Path | None) -> dict[str, Any] | None:
    assert path is not None
    if await agent.ask("guest-ping", path) is None:
        await asyncio.sleep(1.0)
        return None
    info = await agent.ask("guest-get-osinfo", path)
    return info if isinstance(info, dict) else None


async def _kernel_from_memory(monitor: Monitor, watcher: Watcher, opts: Options, work: WorkDir) -> None:
    """A quiet console showed no banner: read the running kernel's version from guest memory."""
    t = time.monotonic()
    try:
        version = await monitor.find_kernel_banner(opts.memory_mb << 20, work.path / "memory.window")
    except DrillError as e:
        log.debug("no kernel version from memory: %s", e)
        return
    log.debug("kernel banner in memory: %s (%.1f s)", version, time.monotonic() - t)
    if version is not None:
        how = "read from guest memory: no Linux version line on the console"
        seen = watcher.stages.get("kernel")
        watcher.kernel = version
        if seen is None:
            watcher.set_kernel(version, None, how)
        else:
            watcher.stages["kernel"] = Stage("kernel", seen.seconds, f"{version} ({how})")


async def _power_off(
    monitor: Monitor, proc: Process, grace: float, agent: Agent | None, machine: Machine
) -> str:
    """The agent's guest-shutdown when it answered, else the ACPI power button; wait ``grace``
    seconds; then QMP quit; then SIGKILL. Returns how it stopped: "agent", "acpi" or "forced"."""
    how = "acpi"
    if agent is not None and machine.agent_socket is not None:
        how = "agent"
        await agent.shutdown(machine.agent_socket)
    else:
        with contextlib.suppress(DrillError):
            await monitor.powerdown()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return how
        await asyncio.sleep(POLL)
    with contextlib.suppress(DrillError):
        await monitor.quit()
    if await asyncio.to_thread(proc.wait, 5.0) is None:
        proc.kill()
    return "forced"


def _qemu_failed(proc: Process, disks: list[Disk]) -> Exception:
    proc.wait(5.0)
    err = proc.stderr_text()
    last = err.splitlines()[-1] if err else f"exited {proc.poll()}"
    for d in disks:
        if str(d.path) in err and "lock" in err:
            return ImageRefused(f"{d.path}: in use by another program ({last})")
    return DrillError(f"qemu did not start: {last}")
