"""drill stages on serial text recorded from real boots (tests/drill/data), fed as it arrived."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vimgtools.drill.report import DrillReport, render
from vimgtools.drill.stages import STAGES, Stage, Watcher, clean

DATA = Path(__file__).resolve().parents[1] / "drill" / "data"


def feed(w: Watcher, serial: bytes, *, firmware: bytes = b"", chunk: int = 97) -> None:
    """Firmware log first (qemu writes it before the loader runs), then serial in odd-sized chunks."""
    if firmware:
        w.feed_firmware(firmware, 0.5)
    for i in range(0, len(serial), chunk):
        w.feed_serial(serial[i : i + chunk], 1.0 + i / 1000)


def test_non_quiet_debian_to_login_prompt() -> None:
    seen: list[Stage] = []
    w = Watcher(on_stage=seen.append)
    feed(w, (DATA / "debian12-login.serial").read_bytes(), firmware=(DATA / "seabios.firmware").read_bytes())
    assert [s.name for s in seen] == [*STAGES, "login"]
    assert w.kernel == "6.1.0-50-amd64"
    assert w.kernel_timestamps
    assert w.stages["firmware"].detail == "Booting from 0000:7c00"
    assert "Booting `Debian GNU/Linux'" in w.stages["bootloader"].detail
    assert w.stages["userspace"].detail == "Loading, please wait..."
    assert w.stages["login"].detail == "vimgtest login:"
    assert w.failure is None and w.ended
    times = [s.seconds for s in seen]
    assert all(t is not None for t in times) and times == sorted(times)  # type: ignore[type-var]


def test_quiet_console_kernel_implied_user_space_from_first_line() -> None:
    w = Watcher(end="expect", expect=re.compile("VIMG-DONE"))
    feed(w, (DATA / "debian12-quiet.serial").read_bytes(), firmware=(DATA / "seabios.firmware").read_bytes())
    assert w.ended and w.failure is None
    assert w.kernel is None  # a quiet console: the runner reads it from guest memory
    assert w.stages["kernel"].seconds is None
    assert w.stages["userspace"].detail.startswith("VIMG-KERNEL=")
    assert "Loading" not in w.stages["userspace"].detail  # GRUB's lines are not user space


def test_login_prompt_without_newline_is_seen() -> None:
    w = Watcher()
    w.feed_firmware(b"Booting from 0000:7c00\n", 0.1)
    w.feed_serial(b"GRUB loading\r\n[    0.000000] Linux version 6.1.0-9-amd64 (x@y) #1\r\n", 1)
    w.feed_serial(b"Welcome to Debian GNU/Linux 12!\r\n\r\nhost1 log", 2)
    assert not w.ended
    w.feed_serial(b"in: ", 3)
    assert w.ended and w.stages["login"].seconds == 3


def test_zeroed_mbr_firmware_hands_over_and_nothing_follows() -> None:
    w = Watcher()
    w.feed_firmware((DATA / "seabios.firmware").read_bytes(), 0.4)
    assert w.reached("firmware") and not w.reached("bootloader")
    assert w.first_missing() == "bootloader"
    assert w.serial_bytes == 0


def test_no_bootable_device_fails_in_firmware() -> None:
    w = Watcher()
    w.feed_firmware(
        b"Booting from Hard Disk...\nBoot failed: not a bootable disk\n\nNo bootable device.\n", 0.3
    )
    assert w.failure == "the firmware found no bootable device"
    assert w.first_missing() == "firmware"


def test_uefi_shell_means_no_boot_loader() -> None:
    w = Watcher(uefi=True)
    feed(w, (DATA / "ovmf-no-loader.serial").read_bytes())
    assert not w.reached("firmware")  # starting the internal shell is not a hand-over
    assert w.failure == "the firmware found nothing to boot and started the UEFI shell"


def test_uefi_hand_over_then_grub() -> None:
    w = Watcher(uefi=True)
    w.feed_serial(b'\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 "UEFI QEMU HARDDISK" from PciRoot(0x0)\r\n', 1)
    assert not w.reached("firmware")
    w.feed_serial(b'BdsDxe: starting Boot0001 "UEFI QEMU HARDDISK" from PciRoot(0x0)/Pci(0x3,0x0)\r\n', 2)
    assert w.stages["firmware"].seconds == 2
    w.feed_serial(b"\x1b[H\x1b[J", 3)
    assert w.stages["bootloader"].seconds == 3


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            b'You are in emergency mode. After logging in, type "journalctl -xb" to view\r\n',
            "systemd started the emergency shell",
        ),
        (
            b"Give root password for maintenance\r\n(or press Control-D to continue): ",
            "systemd started the emergency shell",
        ),
        (
            b"ALERT!  UUID=1234 does not exist.  Dropping to a shell!\r\n",
            "the initramfs gave up and started its shell",
        ),
        (b"(initramfs) ", "the initramfs gave up and started its shell"),
        (b"[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n", "the kernel panicked"),
        (b"grub rescue> ", "GRUB stopped at its rescue prompt"),
    ],
)
def test_failure_lines(text: bytes, reason: str) -> None:
    w = Watcher()
    w.feed_firmware(b"Booting from 0000:7c00\n", 0.1)
    w.feed_serial(b"Booting `Debian'\r\n[    0.000000] Linux version 6.1.0-9-amd64 (x@y)\r\n", 1)
    w.feed_serial(text, 5)
    assert w.failure == reason
    assert w.failure_seconds == 5
    assert any(clean(text).strip()[:20] in line for line in w.last_lines())


def test_expect_matches_the_raw_line() -> None:
    w = Watcher(end="expect", expect=re.compile(r"Reached target .*Multi-User"))
    w.feed_serial(b"Booting `x'\r\n[    0.0] Linux version 6.1.0 (a)\r\nLoading, please wait...\r\n", 1)
    w.feed_serial(
        b"[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[0;1;39mmulti-user.target\x1b[0m - Multi-User System.\r\n",
        9,
    )
    assert w.ended and w.stages["expect"].seconds == 9


def test_kernel_without_timestamps_needs_known_user_space_words() -> None:
    w = Watcher()
    w.feed_serial(b"Booting `x'\r\nLinux version 5.10.0-9-amd64 (a) #1\r\nPCI: probing\r\nACPI: ok\r\n", 1)
    assert not w.reached("userspace")
    w.feed_serial(b"Begin: Loading essential drivers ... done.\r\n", 2)
    assert w.stages["userspace"].seconds == 2


def test_last_lines_are_clean_and_twenty() -> None:
    w = Watcher()
    w.feed_serial(b"".join(b"\x1b[1mline %d\x1b[0m\r\n" % i for i in range(50)), 1)
    assert w.last_lines() == [f"line {i}" for i in range(30, 50)]


def test_report_json_has_exactly_the_issue_fields_and_render_names_the_failed_stage() -> None:
    stages = [Stage("firmware", 0.4, "Booting from 0000:7c00")]
    r = DrillReport(
        booted=False,
        kernel=None,
        stages=stages,
        accel="tcg",
        seconds=30.0,
        log=Path("/tmp/x/serial.log"),
        last_lines=[],
        reason="timed out after 30 s",
        failed_stage="bootloader",
        notes=["nothing on the serial console: this guest's console is not on ttyS0"],
    )
    d = r.to_dict()
    assert set(d) == {"result", "kernel", "stages", "accel", "seconds", "log", "last_lines"}
    assert d["result"] == "failed" and d["stages"] == [{"name": "firmware", "seconds": 0.4}]
    text = render(r)
    assert "bootloader" in text and "FAILED HERE" in text.split("bootloader", 1)[1].splitlines()[0]
    assert "last stage reached: firmware" in text
    assert "nothing on the serial console: this guest's console is not on ttyS0" in text
    r.booted, r.reason, r.failed_stage = True, None, None
    assert "last_lines" not in r.to_dict()
