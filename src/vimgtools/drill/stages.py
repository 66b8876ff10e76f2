"""Stages of a boot, read from the firmware's debug log and the serial console (pure; no I/O).

A :class:`Watcher` is fed the bytes as they arrive, each feed with its time since the guest was
started, and keeps what was reached and when:

``firmware``    the firmware handed over to a boot loader (SeaBIOS ``Booting from 0000:7c00`` on its
                debug port; OVMF ``BdsDxe: starting Boot####`` on the serial console, its shell excepted)
``bootloader``  the boot loader's first output on the serial console
``kernel``      the kernel's first output; the ``Linux version`` line gives the version
``userspace``   the first line that is not the kernel's (the initramfs, init, a getty)
end             ``login`` (a login prompt, the default), ``expect`` (``--expect REGEX`` matched) or
                ``agent`` (set by the runner when the guest agent answered)

A stage seen only because a later one was (a boot loader that prints nothing, a ``quiet`` kernel)
is reached with ``seconds = None``. Lines that mean the boot failed (no bootable device, the UEFI
shell, GRUB rescue, a kernel panic, the initramfs or systemd emergency shell) set ``failure``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("firmware", "bootloader", "kernel", "userspace")
END_STAGES = ("login", "expect", "agent")

# Escape sequences; then what is left of one cut short (systemd shortens long unit names with "…").
_ANSI = re.compile(rb"\x1b(\[[0-9;?=]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78cDEHM]|\[[0-9;?=]*|)")
_KTIME = re.compile(r"^\[\s*\d+\.\d+\]")
_BANNER = re.compile(r"Linux version (\S+)")
_LOGIN = re.compile(r"^\S+ login: *$")
# What the kernel prints before its banner, or without timestamps, that is not user space.
_KERNEL_EARLY = re.compile(
    r"^(Probing EDD|Decompressing Linux|Parsing ELF|Booting the kernel|early console in|"
    r"KASLR |Physical KASLR|Linux version )"
)
# User space's usual first words, for a kernel that prints without timestamps.
_USERSPACE = re.compile(
    r"^(Loading, please wait|Begin: |Welcome to |systemd\[1\]|\[  OK  \]|\[FAILED\]|Starting |"
    r"INIT: |dracut|starting version|Debian GNU|Ubuntu |.* login: *$)"
)
_FIRMWARE_SERIAL = re.compile(r"^(SeaBIOS \(version|Booting from |iPXE|Press ESC for boot menu|BdsDxe: )")
_BIOS_HANDOVER = re.compile(r"Booting from [0-9a-fA-F]{4}:[0-9a-fA-F]{4}")
_UEFI_HANDOVER = re.compile(r'BdsDxe: starting Boot[0-9A-Fa-f]{4} "(?P<what>[^"]*)"')
_UEFI_NOT_A_LOADER = re.compile(r"EFI Internal Shell|UEFI Shell|PXE|HTTP", re.IGNORECASE)
# Boot loaders' own lines, so that a quiet kernel's first user-space line is not taken from them.
_LOADER_LINE = re.compile(
    r"^\s*(Booting [`'\"]|Loading |Welcome to GRUB|GRUB |error: |Press any key|"
    r"(SYSLINUX|EXTLINUX|ISOLINUX|PXELINUX) |boot: |Ready\.|ok$|EFI stub: )"
)

# (pattern, what it means): checked on complete lines and on the unfinished last line (prompts).
FAILURES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), what)
    for p, what in (
        (r"No bootable device", "the firmware found no bootable device"),
        (r"BdsDxe: No bootable option", "the firmware found no bootable device"),
        (r"UEFI Interactive Shell|^Shell> ", "the firmware found nothing to boot and started the UEFI shell"),
        (r"grub rescue> *$", "GRUB stopped at its rescue prompt"),
        (r"^grub> *$", "GRUB stopped at its command line (no usable configuration)"),
        (r"Kernel panic - not syncing", "the kernel panicked"),
        (r"Dropping to a shell|^\(initramfs\) *$", "the initramfs gave up and started its shell"),
        (
            r"You are in emergency mode|Give root password for maintenance|Press Enter for maintenance|"
            r"Cannot open access to console, the root account is locked",
            "systemd started the emergency shell",
        ),
        (r"You are in rescue mode", "systemd started the rescue shell"),
        (r"Entering emergency mode|^dracut:/# *$", "dracut started its emergency shell"),
    )
)


def clean(raw: bytes) -> str:
    """Serial bytes as text: terminal escapes and carriage returns removed."""
    return _ANSI.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")


@dataclass(frozen=True)
class Stage:
    """A stage reached: its name, seconds since the guest started (None: implied by a later one)."""

    name: str
    seconds: float | None
    detail: str = ""


class Watcher:
    """Reads a boot as it happens. ``on_stage`` is called once per stage, in order."""

    def __init__(
        self,
        *,
        end: str = "login",
        expect: re.Pattern[str] | None = None,
        uefi: bool = False,
        on_stage: Callable[[Stage], None] | None = None,
    ) -> None:
        if end not in END_STAGES:
            raise ValueError(f"end {end!r}")
        if end == "expect" and expect is None:
            raise ValueError("end 'expect' needs a pattern")
        self.end = end
        self.expect = expect
        self.uefi = uefi
        self.on_stage = on_stage
        self.stages: dict[str, Stage] = {}
        self.kernel: str | None = None
        self.kernel_timestamps = False
        self.failure: str | None = None
        self.failure_seconds: float | None = None
        self.lines: list[str] = []  # complete serial lines, cleaned
        self.serial_bytes = 0
        self._partial = b""
        self._fw_partial = b""

    # -- results --------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.end in self.stages

    def reached(self, name: str) -> bool:
        return name in self.stages

    def last_reached(self) -> str | None:
        names = [n for n in (*STAGES, self.end) if n in self.stages]
        return names[-1] if names else None

    def first_missing(self) -> str | None:
        for n in (*STAGES, self.end):
            if n not in self.stages:
                return n
        return None

    def ordered(self) -> list[Stage]:
        return [self.stages[n] for n in (*STAGES, self.end) if n in self.stages]

    def last_lines(self, n: int = 20) -> list[str]:
        tail = [*self.lines, clean(self._partial)] if self._partial.strip() else list(self.lines)
        return [line for line in tail if line.strip()][-n:]

    # -- marking --------------------------------------------------------
    def mark(self, name: str, seconds: float | None, detail: str = "") -> None:
        """Reach ``name`` (and, implied, every earlier stage not yet reached)."""
        if name in self.stages:
            return
        order = (*STAGES, self.end)
        for earlier in order[: order.index(name)]:
            if earlier not in self.stages:
                self._add(Stage(earlier, None, "implied by a later stage"))
        self._add(Stage(name, seconds, detail))

    def _add(self, stage: Stage) -> None:
        self.stages[stage.name] = stage
        if self.on_stage is not None:
            self.on_stage(stage)

    def fail(self, reason: str, seconds: float) -> None:
        if self.failure is None:
            self.failure = reason
            self.failure_seconds = seconds

    def set_kernel(self, version: str, seconds: float | None, how: str) -> None:
        if self.kernel is None:
            self.kernel = version
        self.mark("kernel", seconds, f"{version} ({how})")

    # -- feeding --------------------------------------------------------
    def feed_firmware(self, data: bytes, seconds: float) -> None:
        """The firmware's debug log (SeaBIOS writes it to port 0x402)."""
        text = self._fw_partial + data
        *complete, self._fw_partial = text.split(b"\n")
        for raw in complete:
            line = clean(raw)
            if _BIOS_HANDOVER.search(line):
                self.mark("firmware", seconds, line.strip())
            elif "No bootable device" in line:
                self.fail("the firmware found no bootable device", seconds)

    def feed_serial(self, data: bytes, seconds: float) -> None:
        if not data:
            return
        self.serial_bytes += len(data)
        text = self._partial + data
        *complete, self._partial = text.split(b"\n")
        for raw in complete:
            self._line(raw, seconds, complete=True)
        if self._partial:
            self._line(self._partial, seconds, complete=False)

    def _line(self, raw: bytes, seconds: float, *, complete: bool) -> None:
        line = clean(raw).rstrip("\n")
        if complete:
            self.lines.append(line)
            del self.lines[:-200]
        stripped = line.strip()
        for pattern, what in FAILURES:
            if pattern.search(stripped):
                self.fail(what, seconds)
        if not self.reached("firmware"):
            m = _UEFI_HANDOVER.search(stripped)
            if m and not _UEFI_NOT_A_LOADER.search(m.group("what")):
                self.mark("firmware", seconds, stripped)
                return
            if self.uefi or _FIRMWARE_SERIAL.match(stripped) or not raw.strip():
                return  # the firmware talking, or nothing yet
        elif not self.reached("bootloader"):
            if _FIRMWARE_SERIAL.match(stripped):
                return
            if raw.strip():
                self.mark("bootloader", seconds, stripped[:80])
        if not raw.strip():
            return
        if not self.reached("bootloader"):
            self.mark("bootloader", seconds, stripped[:80])
        m = _BANNER.search(stripped)
        if m:
            self.kernel_timestamps = bool(_KTIME.match(stripped))
            self.set_kernel(m.group(1), seconds, "Linux version line")
        elif not self.reached("userspace") and complete and stripped:
            self._maybe_userspace(stripped, seconds)
        if self.end == "login" and _LOGIN.match(stripped) and self.reached("bootloader"):
            self.mark("login", seconds, stripped)
        elif self.end == "expect" and self.expect is not None and self.expect.search(line):
            self.mark("expect", seconds, stripped[:120])

    def _maybe_userspace(self, line: str, seconds: float) -> None:
        if _KTIME.match(line) or _KERNEL_EARLY.match(line):
            self.kernel_timestamps = self.kernel_timestamps or bool(_KTIME.match(line))
            if not self.reached("kernel"):
                self.mark("kernel", seconds, "kernel output (no Linux version line: a quiet console)")
            return
        if not self.reached("kernel") and _LOADER_LINE.match(line):
            return  # still the boot loader
        if self.reached("kernel") and not self.kernel_timestamps and not _USERSPACE.match(line):
            return  # a kernel printing without timestamps: only known user-space lines count
        self.mark("userspace", seconds, line[:120])
