"""Real parts for the replicate tests: a running Debian 12 guest that writes, and the proof on a replica.

The guest is the cached ``grub2`` test guest of tests/rekernel/guestbuild.py with:

- qemu-guest-agent (unpacked as the drill tests do: udev starts it when the virtio-serial port
  ``org.qemu.guest_agent.0`` appears), no getty, and the report unit that powers off disabled;
  ``/usr/sbin/shutdown`` acting at once (the agent's ``guest-shutdown`` works without logind); a
  small initramfs (virtio and ext4 only: boots 10-15 s faster under TCG); slow units masked;
- a data disk ``vdb``: ext4 on the whole disk, label ``vimgdata``, mounted at ``/srv`` by UUID;
- ``vimg-workload.service``: writes numbered files, odd numbers on the root filesystem
  (``/var/lib/w/000001``), even ones on the data disk (``/srv/w/000002``), each 4-64 KiB of
  ``yes "vimg-w NNNNNN"``, fsync'd with its directory, then appends the file's ``sha256sum`` line to
  ``/srv/w/log`` and fsyncs that. Only files the log lists are promised durable. After a restart it
  goes on after the log's last complete line. A line every 50 files on ttyS0 (``VIMG-W n=...``).
- ``vimg-check.service``, ordered before the workload at every boot (cheap: one ``sha256sum -c``):
  every file the log lists (complete lines) exists with its content, and ``/srv`` is the data disk.
  One line on ttyS0: ``VIMG-CHECK ok files=N last=NNNNNN`` or ``VIMG-CHECK bad files=N ok=K ...``.

The disks are built once (root: a loop mount) and cached as qcow2 v3 (persistent dirty bitmaps
live only there) in ``$VIMG_TEST_CACHE``, keyed by this file's builder code and the grub2 guest's
key; tests copy them. Guests run under TCG (nested KVM hangs on the build machines), started
through libvirt (``start_libvirt_guest``) or by qemu directly with QMP (``start_qmp_guest``).
``check_replica(dest)`` boots a replica directory through the drill, reads the check's line, and
checks every ext filesystem of the replica on the host (``e2fsck`` on a throw-away overlay).

API (fixtures in conftest.py: ``libvirtd``, ``libvirt_guest``, ``qmp_guest``, ``guest_disks``,
``libvirt_tmp``):

- ``build_disks() -> (vda, vdb)`` cached, read-only; ``copy_disks(dir) -> [dir/vda.qcow2, dir/vdb.qcow2]``.
- ``start_libvirtd(uri) -> Daemons``, ``stop_daemons(d)``, ``remove_test_domains(uri)``; domain names
  start with ``DOMAIN_PREFIX`` (``vimg-test-PID-``: this session's, removed at its end);
  ``libvirt_dir()``: a directory libvirt's QEMU can reach (see LIBVIRT_IMAGES for why).
- ``start_libvirt_guest(uri, name, disks, console) -> LibvirtGuest``: ``.name``, ``.dom``, ``.disks``,
  ``.console``, ``.pid()``, ``.start()``, ``.destroy(sigkill=True)``, ``.shutdown()``, ``.undefine()``.
- ``start_qmp_guest(disks, workdir) -> QmpGuest``: ``.qmp_socket``, ``.agent_socket``, ``.qmp(cmd,
  args)``, ``.stop()`` (QMP quit), ``.kill()`` (SIGKILL), ``.start()`` (again), ``.shutdown()``.
- Both (``Guest``): ``agent(cmd, args)``, ``wait_agent(timeout)``, ``workload_files()``,
  ``workload_count()``, ``wait_workload(n)``, ``freeze()``, ``thaw()``, ``read_file(path)``,
  ``console_text()``, ``console_tail()``.
- ``check_replica(dest) -> CheckResult``: ``.ok`` (= ``.check_ok and .clean``), ``.line``, ``.files``,
  ``.fsck`` (``Fsck`` per filesystem), ``.report`` (the drill's), ``.console``, ``.describe()``;
  ``replica_files(dest)``: the log as the replica holds it (host side, no boot);
  ``corrupt_data_file(raw_vdb, path)`` for negative controls.

Run by hand to warm the cache: ``python tests/replicate/guests.py disks``; to check a replica:
``python tests/replicate/guests.py check DEST``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rekernel"))

import guestbuild  # type: ignore[import-not-found]

from vimgtools.children import die_with_parent

TESTS = Path(__file__).resolve().parents[1]

# --- the guest's disks -------------------------------------------------------------------------

DATA_SIZE = 1 << 30
DATA_LABEL = "vimgdata"
DATA_UUID = "5a1d0c4e-7e57-4d15-9a7a-000000000001"  # fixed: the guest's fstab names it
ROOT_OFFSET = 2048 * 512  # guestbuild's partition 1 (the root of the grub2 guest)
LOG = "/srv/w/log"
#: the workload stops after this many files (about 700 MB over both disks); tests need minutes, not hours
WORKLOAD_MAX = 20000

WORKLOAD_SCRIPT = r"""#!/bin/sh
# vimgtools replicate tests: numbered files, each fsync'd with its directory, then its line in the log.
# Only files the log lists (complete lines) are promised durable.
set -u
LOG=/srv/w/log
MAX=${VIMG_W_MAX:-20000}
mountpoint -q /srv || { echo "VIMG-W error: /srv is not mounted" >/dev/ttyS0; exit 1; }
mkdir -p /srv/w /var/lib/w
sync /srv /var/lib /srv/w /var/lib/w
touch "$LOG"
sync "$LOG" /srv/w
# A torn last line (the guest killed while appending) is not promised: cut it off.
if [ -n "$(tail -c 1 "$LOG")" ]; then
    head -n "$(wc -l < "$LOG")" "$LOG" > "$LOG.tmp"
    sync "$LOG.tmp"
    mv "$LOG.tmp" "$LOG"
    sync /srv/w
fi
n=$(( $(wc -l < "$LOG") + 1 ))
echo "VIMG-W start n=$n" >/dev/ttyS0
while [ "$n" -le "$MAX" ]; do
    f=$(printf %06d "$n")
    if [ $((n % 2)) -eq 0 ]; then d=/srv/w; else d=/var/lib/w; fi
    size=$(( (n * 7 % 16 + 1) * 4096 ))
    yes "vimg-w $f" | head -c "$size" > "$d/$f"
    sync "$d/$f" "$d"
    sha256sum "$d/$f" >> "$LOG"
    sync "$LOG"
    [ $((n % 50)) -eq 0 ] && echo "VIMG-W n=$n" >/dev/ttyS0
    n=$((n + 1))
    sleep 0.1
done
echo "VIMG-W done n=$((n - 1))" >/dev/ttyS0
"""

CHECK_SCRIPT = r"""#!/bin/sh
# vimgtools replicate tests: every file the workload's log lists exists with its content.
exec >/dev/ttyS0 2>&1
LOG=/srv/w/log
if ! mountpoint -q /srv; then
    echo "VIMG-CHECK bad files=0 srv-not-mounted"
    exit 0
fi
if [ ! -e "$LOG" ]; then
    echo "VIMG-CHECK ok files=0 last=none no-log"
    exit 0
fi
n=$(wc -l < "$LOG")
tail=whole
[ -n "$(tail -c 1 "$LOG")" ] && tail=torn
out=$(head -n "$n" "$LOG" | sha256sum -c 2>/dev/null)
ok=$(printf '%s\n' "$out" | grep -c ': OK$')
last=$(head -n "$n" "$LOG" | tail -n 1 | sed 's#.*/##')
if [ "$ok" -eq "$n" ]; then
    echo "VIMG-CHECK ok files=$n last=${last:-none} tail=$tail"
else
    first=$(printf '%s\n' "$out" | grep -v ': OK$' | head -n 1 | tr ' ' _)
    echo "VIMG-CHECK bad files=$n ok=$ok failed=$((n - ok)) last=${last:-none} tail=$tail first=$first"
fi
"""

CHECK_UNIT = """[Unit]
Description=vimgtools test check: the files the workload's log lists, with their content
# Wants/After, not Requires: the check runs (and says so) also when /srv could not be mounted.
Wants=srv.mount
After=local-fs.target srv.mount
Before=vimg-workload.service
RequiresMountsFor=/var/lib
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vimg-check
[Install]
WantedBy=multi-user.target
"""

WORKLOAD_UNIT = """[Unit]
Description=vimgtools test workload: numbered files, fsync'd, and their log
After=local-fs.target vimg-check.service
RequiresMountsFor=/srv /var/lib
[Service]
ExecStart=/usr/local/sbin/vimg-workload
[Install]
WantedBy=multi-user.target
"""

SHUTDOWN_SCRIPT = """#!/bin/sh
# vimgtools test guest (no logind): shutdown at once through PID 1, whatever time is asked for.
# --no-block: queue the job and exit, before the shutdown's SIGTERM reaches us (qemu-guest-agent
# calls "terminated abnormally" a child that dies of it: the agent's caller then sees an error).
case " $* " in
    *" -r "*|*" --reboot "*) exec systemctl --no-block reboot ;;
    *" -H "*|*" --halt "*) exec systemctl --no-block halt ;;
    *) exec systemctl --no-block poweroff ;;
esac
"""

# nofail: a replica without its data disk boots and the check says so, instead of stopping in the
# emergency shell. The device timeout is long: under TCG on a loaded host udev took 40 s to announce
# vda1 (a 20 s timeout failed the mount of a disk that was there).
FSTAB_DATA = f"UUID={DATA_UUID} /srv ext4 defaults,nofail,x-systemd.device-timeout=300s 0 2\n"

# Units of the minbase tree that cost TCG boot time and do nothing for these tests (measured with
# systemd-analyze blame: e2scrub_reap 28 s, getty-static 17 s (gettys on tty2-6 without logind),
# lvm2-monitor 6 s).
MASKED = (
    "getty@tty1.service",
    "getty-static.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "lvm2-monitor.service",
    "lvm2-lvmpolld.socket",
    "dm-event.socket",
)


def _drill_conftest() -> ModuleType:
    """tests/drill/conftest.py as a plain module: its ``_with_agent`` and ``mounted_root``."""
    name = "vimg_drill_conftest"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(TESTS / "drill"))
    spec = importlib.util.spec_from_file_location(name, TESTS / "drill" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _customize(root: Path) -> None:
    """The grub2 guest's root tree made into the replicate tests' guest (see the module docstring)."""
    drill = _drill_conftest()
    drill._with_agent(root)
    etc = root / "etc/systemd/system"
    (etc / "multi-user.target.wants/vimg-report.service").unlink()
    # No getty at all (serial-getty@ttyS0 is masked by guestbuild already), and no slow extras.
    for unit in MASKED:
        (etc / unit).unlink(missing_ok=True)
        (etc / unit).symlink_to("/dev/null")
    sbin = root / "usr/local/sbin"
    for name, text in (("vimg-workload", WORKLOAD_SCRIPT), ("vimg-check", CHECK_SCRIPT)):
        (sbin / name).write_text(text.replace("${VIMG_W_MAX:-20000}", f"${{VIMG_W_MAX:-{WORKLOAD_MAX}}}"))
        (sbin / name).chmod(0o755)
    for name, text in (("vimg-check.service", CHECK_UNIT), ("vimg-workload.service", WORKLOAD_UNIT)):
        (etc / name).write_text(text)
        (etc / "multi-user.target.wants" / name).symlink_to(f"/etc/systemd/system/{name}")
    # qemu-guest-agent powers off with "/sbin/shutdown -P +0 MSG"; systemd's shutdown hands any time
    # to logind, which a minbase guest lacks (no D-Bus): "child process has failed to shutdown".
    shutdown = root / "usr/sbin/shutdown"
    shutdown.unlink()
    shutdown.write_text(SHUTDOWN_SCRIPT)
    shutdown.chmod(0o755)
    (root / "srv").mkdir(exist_ok=True)
    with open(root / "etc/fstab", "a") as f:
        f.write(FSTAB_DATA)


#: What the initramfs needs to find and mount a virtio root: the rest is left out (MODULES=list).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")


def _small_initramfs(root: Path) -> None:
    """A small initramfs (MODULES=list: virtio and ext4 only, about 8 MiB instead of 32). Under TCG,
    GRUB reading Debian's 32 MiB initramfs takes 13-16 s of every boot (docs/drill.md); the replicas
    of this guest are booted by many tests. Made by the guest's own mkinitramfs, in a chroot."""
    ver = guestbuild.guest_kernel_version(root)
    conf = root / "etc/initramfs-tools"
    (conf / "conf.d/vimg-modules").write_text("MODULES=list\n")
    with open(conf / "modules", "a") as f:
        f.write("".join(m + "\n" for m in INITRAMFS_MODULES))
    with guestbuild.chroot_mounts(root):
        guestbuild.run("chroot", root, "mkinitramfs", "-o", f"/boot/initrd.img-{ver}", ver)


def disks_key() -> str:
    drill = _drill_conftest()
    return str(
        guestbuild._key(
            guestbuild.image_key(),
            build_disks,
            _customize,
            drill._with_agent,
            drill._agent_debs,
            drill.AGENT_DEBS,
            WORKLOAD_SCRIPT,
            CHECK_SCRIPT,
            CHECK_UNIT,
            WORKLOAD_UNIT,
            FSTAB_DATA,
            MASKED,
            SHUTDOWN_SCRIPT,
            DATA_SIZE,
            WORKLOAD_MAX,
        )
    )


def build_disks() -> tuple[Path, Path]:
    """The cached pair (``vda.qcow2``, ``vdb.qcow2``), built once (root: a loop mount). Copy, never use."""
    key = disks_key()
    vda = guestbuild.cached("replicate-vda.qcow2", key)
    vdb = guestbuild.cached("replicate-vdb.qcow2", key)
    done = guestbuild.cached("replicate-disks.done", key)
    with guestbuild.locked("replicate-disks"):
        if done.exists():
            return vda, vdb
        base = guestbuild.guest_image("grub2")
        vda.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=guestbuild.CACHE) as tmp:
            raw = Path(tmp) / "vda.raw"
            guestbuild.run("cp", "--sparse=always", base, raw)
            with _drill_conftest().mounted_root(raw, Path(tmp) / "mnt") as root:
                _customize(root)
                _small_initramfs(root)
            data = Path(tmp) / "vdb.raw"
            with open(data, "wb") as f:
                f.truncate(DATA_SIZE)
            # Inode tables and journal written now, not by ext4lazyinit in the running guest.
            guestbuild.run(
                "mkfs.ext4", "-F", "-q", "-L", DATA_LABEL, "-U", DATA_UUID,
                "-E", "lazy_itable_init=0,lazy_journal_init=0", data,
            )  # fmt: skip
            for src, dst in ((raw, vda), (data, vdb)):
                guestbuild.run("qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", src, dst)
        done.touch()
    return vda, vdb


def copy_disks(dest: Path) -> list[Path]:
    """Fresh copies of the cached disks in ``dest``: ``[dest/vda.qcow2, dest/vdb.qcow2]``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in build_disks():
        dst = dest / src.name.removeprefix("replicate-")
        guestbuild.run("cp", "--sparse=always", src, dst)
        out.append(dst)
    return out


# --- the guest agent, and what the workload wrote -------------------------------------------


class AgentError(Exception):
    """The guest agent did not answer, or answered with an error."""


def parse_log(text: str) -> list[str]:
    """The paths the workload's log lists, complete lines only (a torn last line is not promised)."""
    lines = text.split("\n")[:-1]  # whatever follows the last newline is torn
    return [ln.split("  ", 1)[1] for ln in lines if "  " in ln]


class Guest:
    """What both kinds of running guest offer: the agent, the workload's progress, the console."""

    console: Path

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def wait_agent(self, timeout: float = 300) -> float:
        """Wait until the agent answers ``guest-ping``; returns the seconds waited."""
        t0 = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - t0 < timeout:
            if not self.is_running():
                raise AgentError(f"the guest is not running (any more)\n{self.console_tail()}")
            try:
                self.agent("guest-ping", timeout=3)
                return time.monotonic() - t0
            except AgentError as e:
                last = e
                time.sleep(1)
        raise AgentError(f"no answer from the guest agent in {timeout:.0f} s ({last})\n{self.console_tail()}")

    def read_file(self, path: str) -> bytes:
        """A file of the guest, through the agent (guest-file-open/read/close)."""
        import base64

        handle = self.agent("guest-file-open", {"path": path, "mode": "r"})
        data = b""
        try:
            while True:
                got = self.agent("guest-file-read", {"handle": handle, "count": 1 << 20})
                data += base64.b64decode(got.get("buf-b64", ""))
                if got.get("eof") or not got.get("count"):
                    return data
        finally:
            with contextlib.suppress(AgentError):
                self.agent("guest-file-close", {"handle": handle})

    def workload_files(self) -> list[str]:
        """The files the workload's log lists so far (in order; each one fsync'd before its line)."""
        try:
            return parse_log(self.read_file(LOG).decode())
        except AgentError as e:
            if "No such file" in str(e):
                return []
            raise

    def workload_count(self) -> int:
        """How many files the workload's log lists so far."""
        return len(self.workload_files())

    def wait_workload(self, count: int, timeout: float = 300) -> int:
        """Wait until the log lists at least ``count`` files; returns how many it lists."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.workload_count()
            if n >= count or time.monotonic() > deadline:
                break
            time.sleep(1)
        if n < count:
            raise AssertionError(f"the workload wrote {n} files, not {count}, in {timeout:.0f} s")
        return n

    def freeze(self) -> int:
        """``guest-fsfreeze-freeze``: the number of filesystems frozen."""
        return int(self.agent("guest-fsfreeze-freeze", timeout=30))

    def thaw(self) -> int:
        return int(self.agent("guest-fsfreeze-thaw", timeout=30))

    def console_text(self) -> str:
        try:
            return self.console.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        text = "\n".join(self.console_text().splitlines()[-lines:])
        return f"--- {self.console} (last {lines} lines) ---\n{text}"


# --- libvirt --------------------------------------------------------------------------------

#: Directory for the disks of libvirt guests. QEMU runs as libvirt-qemu, and libvirt's DAC driver
#: chowns each disk to that user while the domain runs (and back after), but it does not open the
#: directories on the way: every one of them must be searchable by libvirt-qemu. pytest's tmp dirs
#: are under /tmp/pytest-of-root (0700), so qemu fails there with "Permission denied". The default
#: image pool's directory is searchable (0711) and is where an admin's disks are, so tests get a
#: 0755 directory of their own beneath it. The alternatives were worse: <seclabel type='none'/>
#: keeps qemu as libvirt-qemu without chowning anything (then it cannot open root's 0600 files at
#: all), and a static root:root DAC label would hide the permission problems the replicate code must
#: handle on a real host (the backup socket's directory must be writable by libvirt-qemu).
LIBVIRT_IMAGES = Path("/var/lib/libvirt/images")
TEST_PREFIX = "vimg-test-"
#: Names of this test session's domains (and directories): several sessions share this machine and
#: its libvirtd (engineers run the suite at the same time), and each removes only its own, and those
#: of sessions that are gone (their pid is not running).
DOMAIN_PREFIX = f"{TEST_PREFIX}{os.getpid()}-"


def libvirt_dir(prefix: str = DOMAIN_PREFIX) -> Path:
    """A new directory libvirt's QEMU can reach (see LIBVIRT_IMAGES), 0755."""
    LIBVIRT_IMAGES.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=LIBVIRT_IMAGES))
    d.chmod(0o755)
    return d


def domain_xml(
    name: str, disks: Sequence[Path], console: Path, *, memory_mb: int = 768, cpus: int = 1
) -> str:
    """The test guest's libvirt definition: TCG, virtio disks vda, vdb, ... (qcow2), the agent's
    channel, the serial console to a file, no graphics, no network."""
    targets = [f"vd{chr(ord('a') + i)}" for i in range(len(disks))]
    disk_xml = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{escape(str(Path(d).absolute()))}'/>
      <target dev='{t}' bus='virtio'/>
    </disk>"""
        for d, t in zip(disks, targets, strict=True)
    )
    # No <graphics> (type 'none' is rejected); a video model 'none' so libvirt adds no VGA either.
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>{cpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <cpu mode='maximum' check='none'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{escape(str(console.absolute()))}' append='on'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class LibvirtGuest(Guest):
    """A persistent libvirt domain of the test guest (defined and started by ``start_libvirt_guest``)."""

    uri: str
    name: str
    disks: list[Path]
    console: Path
    conn: Any = field(repr=False)
    dom: Any = field(repr=False)

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        from vimgtools.bindings import load_libvirt_qemu

        libvirt, libvirt_qemu = _libvirt(), load_libvirt_qemu()
        cmd: dict[str, Any] = {"execute": command}
        if arguments:
            cmd["arguments"] = arguments
        try:
            out = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(cmd), int(max(timeout, 1)), 0)
        except libvirt.libvirtError as e:
            raise AgentError(f"{command}: {e}") from e
        return json.loads(out).get("return") if out else None

    def pid(self) -> int | None:
        """The domain's qemu process (libvirt's pid file), None when it is not running."""
        try:
            return int(Path(f"/run/libvirt/qemu/{self.name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        try:
            return bool(self.dom.isActive())
        except _libvirt().libvirtError:  # undefined behind our back
            return False

    def start(self) -> None:
        """Start the (shut-off) domain again; the console file is appended to."""
        self.dom.create()

    def destroy(self, *, sigkill: bool = True) -> None:
        """Stop qemu at once. ``sigkill=True`` (default): ``kill -9`` of the qemu process, as a host
        crash or the OOM killer would: QEMU cannot store its persistent dirty bitmaps, which stay
        flagged in-use in the qcow2 ("tracking lost"). libvirt notices the monitor hanging up and
        marks the domain shut off (reason crashed). ``sigkill=False``: ``virDomainDestroy``, which
        sends SIGTERM first: QEMU exits cleanly and keeps its bitmaps (the guest sees a power cut)."""
        if not self.is_running():
            return
        pid = self.pid()
        if sigkill and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_off(30)
        else:
            self.dom.destroy()

    def shutdown(self, timeout: float = 120) -> None:
        """A clean power-off through the agent (the test guest hears no ACPI button: no logind,
        no acpid); waits until the domain is shut off, killing it after ``timeout`` seconds."""
        if not self.is_running():
            return
        libvirt = _libvirt()
        try:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError as e:
            # The agent may report its child killed by the shutdown it started ("child process has
            # terminated abnormally"): an error only if the guest does not go down.
            if "terminated abnormally" not in str(e):
                raise
        try:
            self._wait_off(timeout)
        except TimeoutError:
            self.dom.destroy()
            raise

    def _wait_off(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout:.0f} s")
            time.sleep(0.2)

    def undefine(self) -> None:
        """Destroy and undefine the domain, and close our connection (the handle is done)."""
        undefine_domain(self.dom)
        # Dropped now, not at interpreter exit (where libvirt's __del__ fails noisily: its C module
        # is already gone).
        self.dom = None
        with contextlib.suppress(Exception):
            self.conn.close()


def _libvirt() -> ModuleType:
    from vimgtools.bindings import load_libvirt

    libvirt = load_libvirt()
    # libvirt's default handler prints every error on stderr, also those we expect and catch (an
    # agent that is not up yet, every second of a boot); the exceptions carry the same text.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def start_libvirt_guest(
    uri: str, name: str, disks: Sequence[Path], console: Path, *, memory_mb: int = 768, cpus: int = 1
) -> LibvirtGuest:
    """Define (persistent) and start the test guest as libvirt domain ``name`` on ``uri``.

    ``disks`` (qcow2, vda first) and ``console`` must be in a directory libvirt's QEMU can reach
    (``libvirt_dir()``). Names should start with ``DOMAIN_PREFIX`` (this session's): the ``libvirtd``
    fixture removes such domains at the end. Returns at once; ``wait_agent()`` waits for the boot.
    """
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    console.parent.mkdir(parents=True, exist_ok=True)
    xml = domain_xml(name, [Path(d) for d in disks], console, memory_mb=memory_mb, cpus=cpus)
    dom = conn.defineXML(xml)
    try:
        dom.create()
    except libvirt.libvirtError:
        undefine_domain(dom)
        raise
    return LibvirtGuest(
        uri=uri, name=name, disks=[Path(d) for d in disks], console=console, conn=conn, dom=dom
    )


def undefine_domain(dom: Any) -> None:
    """Destroy (if running) and undefine, with its checkpoints' and snapshots' metadata."""
    libvirt = _libvirt()
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(flags)


def remove_test_domains(uri: str, prefix: str = DOMAIN_PREFIX) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix`` (this session's), and
    those of test sessions that are gone (``vimg-test-PID-...`` of a pid not running); their names."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        gone = []
        for dom in conn.listAllDomains():
            name = dom.name()
            m = re.match(re.escape(TEST_PREFIX) + r"(\d+)-", name)
            if name.startswith(prefix) or (m is not None and not _alive(int(m.group(1)))):
                undefine_domain(dom)
                gone.append(name)
        return gone
    finally:
        conn.close()


def sweep_test_dirs(base: Path = LIBVIRT_IMAGES) -> list[Path]:
    """Remove the ``libvirt_dir()`` directories of test sessions that are gone (killed before their
    clean-up); the paths removed."""
    gone = []
    for d in base.glob(f"{TEST_PREFIX}*"):
        m = re.match(re.escape(TEST_PREFIX) + r"(\d+)-", d.name)
        if d.is_dir() and m is not None and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def active_domains(uri: str) -> list[str]:
    """Names of the running domains (anyone's)."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
    finally:
        conn.close()


@dataclass
class Daemons:
    """virtlogd and libvirtd as the ``libvirtd`` fixture found or started them."""

    uri: str
    started: dict[str, int]  # name -> pid of the daemons we started (empty: they were running)
    seconds: float


def virsh_answers(uri: str) -> bool:
    p = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, check=False)
    return p.returncode == 0


def start_libvirtd(uri: str = "qemu:///system", run_dir: Path | None = None, timeout: float = 60) -> Daemons:
    """virtlogd, then libvirtd, as daemons (no systemd here), unless libvirtd already answers.

    virtlogd must run first: without it, domains fail to start ("Failed to connect socket to
    '/run/libvirt/virtlogd-sock'"). The first libvirtd start probes QEMU's capabilities (~8 s).
    """
    t0 = time.monotonic()
    if virsh_answers(uri):
        return Daemons(uri, {}, time.monotonic() - t0)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="vimg-libvirtd-"))
    started: dict[str, int] = {}
    for name in ("virtlogd", "libvirtd"):
        pidfile = run_dir / f"{name}.pid"
        if (
            name == "virtlogd"
            and Path("/run/libvirt/virtlogd-sock").exists()
            and _pid_alive("/run/virtlogd.pid")
        ):
            continue  # someone's virtlogd is serving: use it
        subprocess.run([name, "-d", "--pid-file", str(pidfile)], check=True)
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} -d wrote no pid file {pidfile}")
            time.sleep(0.05)
        started[name] = int(pidfile.read_text())
    daemons = Daemons(uri, started, 0.0)
    deadline = time.monotonic() + timeout
    while not virsh_answers(uri):
        if time.monotonic() > deadline:
            stop_daemons(daemons)
            raise RuntimeError(f"libvirtd did not answer on {uri} within {timeout:.0f} s")
        time.sleep(0.2)
    daemons.seconds = time.monotonic() - t0
    return daemons


def _pid_alive(pidfile: str) -> bool:
    try:
        os.kill(int(Path(pidfile).read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def stop_daemons(daemons: Daemons, timeout: float = 20) -> list[str]:
    """SIGTERM to the daemons we started (libvirtd first), by PID; SIGKILL after ``timeout``. Not
    while domains run (another session's, started on the daemon we started): their names then."""
    if daemons.started and (running := active_domains(daemons.uri)):
        return running
    for name in ("libvirtd", "virtlogd"):
        pid = daemons.started.get(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- plain QEMU with QMP --------------------------------------------------------------------


class UnixAgent:
    """A synchronous client of qemu-guest-agent on a unix socket (one connection a call, resynced
    with ``guest-sync-delimited``: answers left over from a call that timed out are skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.path))
                token = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
                s.sendall(
                    json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
                )
                buf = b""
                while True:  # everything before the 0xFF sentinel is stale
                    buf = self._more(s, buf, deadline)
                    if b"\xff" in buf:
                        buf = buf.rsplit(b"\xff", 1)[1]
                        break
                while True:
                    line, buf = self._line(s, buf, deadline)
                    if json.loads(line).get("return") == token:
                        break
                cmd: dict[str, Any] = {"execute": command}
                if arguments:
                    cmd["arguments"] = arguments
                s.sendall(json.dumps(cmd).encode())
                line, buf = self._line(s, buf, deadline)
        except (OSError, TimeoutError, ValueError) as e:
            raise AgentError(f"{command}: {e}") from e
        answer = json.loads(line)
        if "error" in answer:
            raise AgentError(f"{command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    @staticmethod
    def _more(s: socket.socket, buf: bytes, deadline: float) -> bytes:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        data = s.recv(1 << 20)
        if not data:
            raise OSError("the agent's socket was closed")
        return buf + data

    def _line(self, s: socket.socket, buf: bytes, deadline: float) -> tuple[bytes, bytes]:
        while b"\n" not in buf:
            buf = self._more(s, buf, deadline)
        line, rest = buf.split(b"\n", 1)
        return line, rest


@dataclass
class QmpGuest(Guest):
    """The test guest in a qemu-system-x86_64 started directly (``start_qmp_guest``)."""

    qmp_socket: Path
    agent_socket: Path
    console: Path
    disks: list[Path]
    proc: subprocess.Popen[bytes] | None = field(repr=False)
    stderr: Path
    argv: list[str] = field(repr=False)

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        return UnixAgent(self.agent_socket)(command, arguments, timeout)

    def start(self) -> None:
        """Start qemu (again, after ``stop``, ``kill`` or ``shutdown``): same disks and sockets."""
        assert not self.is_running(), "already running"
        for sock in (self.qmp_socket, self.agent_socket):
            sock.unlink(missing_ok=True)
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        deadline = time.monotonic() + 30
        while not self.qmp_socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"qemu did not start: {self.stderr.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """One QMP command over a fresh connection (QEMU's own client library, synchronous form)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(str(self.qmp_socket))
        try:
            mon.connect()
            return mon.cmd(command, **(arguments or {}))
        finally:
            mon.close()
            drop_qmp_loop()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: its bitmaps stay flagged in-use in the qcow2 (tracking lost)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 20) -> None:
        """QEMU ends now, cleanly for its images (QMP ``quit``: bitmaps stored), SIGKILL if it hangs.
        The guest sees a power cut."""
        if self.proc is not None and self.is_running():
            with contextlib.suppress(Exception):
                self.qmp("quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def shutdown(self, timeout: float = 120) -> None:
        """A clean power-off through the agent; ``stop()`` after ``timeout``."""
        if not self.is_running():
            return
        with contextlib.suppress(AgentError):
            self.agent("guest-shutdown", {"mode": "powerdown"}, timeout=5)
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()


def qmp_argv(disks: Sequence[Path], workdir: Path, *, memory_mb: int = 768, cpus: int = 1) -> list[str]:
    """qemu's command line for ``start_qmp_guest`` (sockets and console in ``workdir``)."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-cpu", "max",
        "-m", str(memory_mb), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"file,id=ser0,path={workdir / 'console.log'},append=on", "-serial", "chardev:ser0",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-chardev", f"socket,id=qga0,path={workdir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    for i, disk in enumerate(disks):
        target = f"vd{chr(ord('a') + i)}"
        argv += [
            "-blockdev", f"driver=file,filename={Path(disk).absolute()},node-name={target}-file",
            "-blockdev", f"driver=qcow2,file={target}-file,node-name={target}",
            "-device", f"virtio-blk-pci,drive={target},id={target}" + (",bootindex=1" if i == 0 else ""),
        ]  # fmt: skip
    return argv


def start_qmp_guest(disks: Sequence[Path], workdir: Path, *, memory_mb: int = 768, cpus: int = 1) -> QmpGuest:
    """The test guest in qemu-system-x86_64 without libvirt: TCG, QMP on ``workdir/qmp.sock``, the
    agent on ``workdir/qga.sock``, disks as ``-blockdev`` qcow2 nodes ``vda``, ``vdb`` (over file
    nodes ``vda-file``, ...) on virtio-blk devices of the same ids, the console appended to
    ``workdir/console.log``. QEMU dies with the thread that started it (PR_SET_PDEATHSIG)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if len(str(workdir / "qmp.sock")) > 100:
        raise ValueError(f"{workdir}: too long for a unix socket path")
    argv = qmp_argv(disks, workdir, memory_mb=memory_mb, cpus=cpus)
    guest = QmpGuest(
        qmp_socket=workdir / "qmp.sock",
        agent_socket=workdir / "qga.sock",
        console=workdir / "console.log",
        disks=[Path(d) for d in disks],
        proc=None,
        stderr=workdir / "qemu.log",
        argv=argv,
    )
    guest.start()
    return guest


def drop_qmp_loop() -> None:
    """Close the event loop qemu.qmp's synchronous client took for this thread, and unset it: an
    asyncio.run() later in the same process (the drill's) would otherwise drop it unclosed, and
    its ResourceWarning fail whichever test the garbage collector happens to run in."""
    import asyncio

    with contextlib.suppress(RuntimeError):
        asyncio.get_event_loop_policy().get_event_loop().close()
    asyncio.set_event_loop(None)


# --- the proof on a replica -----------------------------------------------------------------

CHECK_LINE = re.compile(r"VIMG-CHECK (ok|bad)\b[^\r\n]*")


@dataclass
class Fsck:
    """``e2fsck`` of one filesystem of a replica, on a throw-away overlay."""

    disk: str  # the replica file's name
    offset: int  # the filesystem's start in the disk (bytes)
    needed_recovery: bool  # its journal held transactions to replay (crash-consistent, not frozen)
    journal_rc: int  # e2fsck -E journal_only -y: the journal replayed as a mount would
    check_rc: int  # e2fsck -fn afterwards: 0 = clean
    output: str

    @property
    def clean(self) -> bool:
        """The journal replayed (if it needed it) and no error found after."""
        return self.journal_rc in (0, 1) and self.check_rc == 0


@dataclass
class CheckResult:
    """What ``check_replica`` found: the check's line in the booted replica, and the host's fsck."""

    line: str | None  # "VIMG-CHECK ok files=..." as printed, None if it never was
    fsck: list[Fsck]
    report: Any  # the drill's DrillReport
    console: str  # the replica boot's serial console

    @property
    def check_ok(self) -> bool:
        return self.line is not None and self.line.startswith("VIMG-CHECK ok")

    @property
    def files(self) -> int:
        m = re.search(r"files=(\d+)", self.line or "")
        return int(m.group(1)) if m else -1

    @property
    def clean(self) -> bool:
        return bool(self.fsck) and all(f.clean for f in self.fsck)

    @property
    def ok(self) -> bool:
        return self.check_ok and self.clean

    def describe(self) -> str:
        fs = ", ".join(
            f"{f.disk}@{f.offset}: {'clean' if f.clean else f'rc={f.check_rc}'}"
            + (" (journal replayed)" if f.needed_recovery else "")
            for f in self.fsck
        )
        tail = "\n".join(self.console.splitlines()[-30:])
        return f"check: {self.line}\nfsck: {fs}\n--- replica console (last 30 lines) ---\n{tail}"


def ext_filesystems(image: Path, fmt: str) -> list[tuple[int, int]]:
    """``(offset, size)`` in bytes of the ext2/3/4 filesystems of a disk: the whole disk, or its MBR's
    primary partitions (the test guests' layouts; no GPT, no LVM)."""

    def is_ext(read: Callable[[int, int], bytes], offset: int) -> bool:
        return read(offset + 1024 + 56, 2) == b"\x53\xef"  # the superblock's magic

    with _exported(image, fmt, writable=False) as (dev,), open(dev, "rb") as f:

        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(n)

        if is_ext(read, 0):
            return [(0, os.stat(dev).st_size)]
        mbr = read(0, 512)
        if mbr[510:512] != b"\x55\xaa":
            return []
        found = []
        for i in range(4):
            entry = mbr[446 + 16 * i : 446 + 16 * (i + 1)]
            lba, count = int.from_bytes(entry[8:12], "little"), int.from_bytes(entry[12:16], "little")
            if lba and count and is_ext(read, lba * 512):
                found.append((lba * 512, count * 512))
        return found


@contextlib.contextmanager
def _exported(
    image: Path,
    fmt: str,
    *,
    writable: bool,
    overlay: Path | None = None,
    slices: Sequence[tuple[int, int]] = (),
) -> Iterator[list[Path]]:
    """``image`` as plain files: the whole disk (no ``slices``), or one file per ``(offset, size)``
    slice. A raw image read whole is itself; the rest goes through qemu-storage-daemon's FUSE
    exports, of a qcow2 ``overlay`` backed by the image when writable (the image is never written).

    Slices rather than e2fsck's ``FILE?offset=N``: after replaying a journal e2fsck re-opens the
    filesystem without the offset ("Bad magic number in super-block while trying to re-open")."""
    if fmt == "raw" and not writable and not slices:
        yield [image]
        return
    with tempfile.TemporaryDirectory(prefix="vimg-export-") as tmp:
        if writable:
            assert overlay is not None
            create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.absolute()), "-F", fmt]
            subprocess.run([*create, str(overlay)], check=True)
            top = f"driver=qcow2,node-name=top,file.driver=file,file.filename={overlay}"
        else:
            top = f"driver={fmt},node-name=top,read-only=on,file.driver=file,file.filename={image},file.read-only=on"
        argv = ["qemu-storage-daemon", "--blockdev", top]
        nodes = ["top"]
        if slices:
            nodes = [f"p{i}" for i in range(len(slices))]
            for node, (offset, size) in zip(nodes, slices, strict=True):
                ro = "" if writable else ",read-only=on"
                argv += [
                    "--blockdev",
                    f"driver=raw,node-name={node},file=top,offset={offset},size={size}{ro}",
                ]
        files = [Path(tmp) / node for node in nodes]
        for i, (node, f) in enumerate(zip(nodes, files, strict=True)):
            f.touch()
            on = "on" if writable else "off"
            argv += ["--export", f"type=fuse,id=e{i},node-name={node},mountpoint={f},writable={on}"]
        daemon = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        try:
            deadline = time.monotonic() + 20
            while any(f.stat().st_size == 0 for f in files):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    err = daemon.stderr.read() if daemon.stderr else b""
                    raise RuntimeError(f"qemu-storage-daemon did not export {image}: {err!r}")
                time.sleep(0.05)
            yield files
        finally:
            daemon.terminate()
            daemon.communicate(timeout=30)
            for f in files:
                subprocess.run(["umount", "-l", str(f)], capture_output=True, check=False)


def fsck_disk(image: Path, fmt: str, workdir: Path) -> list[Fsck]:
    """Every ext filesystem of ``image`` checked as a mount would find it: the journal replayed
    (``e2fsck -E journal_only``), then ``e2fsck -fn``; all on a throw-away qcow2 overlay."""
    out: list[Fsck] = []
    found = ext_filesystems(image, fmt)
    if not found:
        return out
    overlay = workdir / f"{image.name}.fsck.qcow2"
    overlay.unlink(missing_ok=True)
    try:
        with _exported(image, fmt, writable=True, overlay=overlay, slices=found) as devs:
            for (offset, _size), dev in zip(found, devs, strict=True):
                head = subprocess.run(
                    ["dumpe2fs", "-h", str(dev)], capture_output=True, text=True, check=False
                )
                recovery = "needs_recovery" in head.stdout
                argv = ["e2fsck", "-y", "-E", "journal_only", str(dev)]
                j = subprocess.run(argv, capture_output=True, text=True, check=False)
                c = subprocess.run(["e2fsck", "-fn", str(dev)], capture_output=True, text=True, check=False)
                text = j.stdout + j.stderr + c.stdout + c.stderr
                out.append(Fsck(image.name, offset, recovery, j.returncode, c.returncode, text))
    finally:
        overlay.unlink(missing_ok=True)
    return out


def data_disk(dest: Path) -> tuple[Path, str]:
    """The data disk (vdb: ext4 on the whole disk, mounted at /srv) of replica directory ``dest``."""
    from vimgtools.replicate.manifest import load

    manifest = load(dest)
    assert manifest is not None, f"{dest}: no manifest.json"
    d = manifest.disk("vdb")
    assert d is not None, f"{dest}: no vdb in the manifest"
    return dest / d.file, d.format


def debugfs(image: Path, fmt: str, request: str) -> str:
    """``debugfs -R REQUEST`` on the first ext filesystem of ``image`` as a mount would find it: its
    journal replayed first, on a throw-away overlay (``/srv/w/log`` is ``/w/log`` on the data disk).
    Without the replay, what the guest fsync'd last may be only in the journal."""
    found = ext_filesystems(image, fmt)
    assert found, f"{image}: no ext filesystem"
    with tempfile.TemporaryDirectory(prefix="vimg-debugfs-") as tmp:
        overlay = Path(tmp) / "overlay.qcow2"
        with _exported(image, fmt, writable=True, overlay=overlay, slices=found[:1]) as (dev,):
            subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(dev)], capture_output=True, check=False)
            p = subprocess.run(["debugfs", "-R", request, str(dev)], capture_output=True, check=True)
    return p.stdout.decode("utf-8", "replace")


def replica_files(dest: Path) -> list[str]:
    """The files the workload's log in replica ``dest`` lists (read on the host, nothing booted)."""
    image, fmt = data_disk(dest)
    return parse_log(debugfs(image, fmt, "cat /w/log"))


def corrupt_data_file(image: Path, path: str, *, block_size: int = 4096) -> None:
    """Overwrite the first 16 bytes of ``path`` (a file of the raw data disk ``image``, e.g.
    ``/srv/w/000002``) in place, behind the filesystem's back, as a bad replication would."""
    inner = path.removeprefix("/srv")
    # The guest's last writes may be in the journal only: replay it in place first (this image is a
    # copy made to be damaged), so that the block found is where the file's data really is.
    subprocess.run(["e2fsck", "-y", "-E", "journal_only", str(image)], capture_output=True, check=False)
    out = subprocess.run(
        ["debugfs", "-R", f"bmap {inner} 0", str(image)], capture_output=True, text=True, check=True
    )
    block = int(out.stdout.strip())
    assert block > 0, f"{path}: no block 0 in {image}"
    with open(image, "r+b") as f:
        f.seek(block * block_size)
        f.write(b"corrupted-by-vimg")
        f.flush()
        os.fsync(f.fileno())


def check_replica(dest: Path, *, timeout: float = 400, workdir: Path | None = None) -> CheckResult:
    """The whole proof on replica directory ``dest`` (its manifest.json names the disks): boot it
    through the drill (TCG, throw-away overlays) until the check prints its line, and fsck every ext
    filesystem of its disks on the host. ``result.ok``: the check said ok and all were clean."""
    from vimgtools.drill import boot
    from vimgtools.replicate.manifest import load

    manifest = load(dest)
    assert manifest is not None, f"{dest}: no manifest.json"
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vimg-check-"))
    work.mkdir(parents=True, exist_ok=True)
    serial = work / "replica-console.log"
    report = boot(
        [dest],
        accel="tcg",
        expect=CHECK_LINE.pattern,
        timeout=timeout,
        grace=0,  # the overlays are thrown away: no need to wait for a power-off nobody hears
        log=serial,
        workdir=work,
    )
    console = serial.read_bytes().decode("utf-8", "replace") if serial.exists() else ""
    m = CHECK_LINE.search(console)
    fsck: list[Fsck] = []
    for d in manifest.disks:
        fsck += fsck_disk(dest / d.file, d.format, work)
    return CheckResult(line=m.group(0).strip() if m else None, fsck=fsck, report=report, console=console)


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "disks"
    if what == "disks":
        for p in build_disks():
            print(p)
        return 0
    if what == "check":
        r = check_replica(Path(argv[1]))
        print(r.describe())
        return 0 if r.ok else 1
    print("usage: guests.py disks | check DEST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
