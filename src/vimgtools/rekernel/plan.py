"""Facts + Kernel -> Plan: the preflight checks and the steps of a kernel swap or a rollback, as data.

Pure: everything comes in as data (``collect_facts``, ``find_kernel``, ``list_initramfs`` read the
guest and the host before); nothing here reads a file or the guest.

The modules convention: ``/lib/modules`` (with usrmerge really ``/usr/lib/modules``) becomes an
absolute symlink to ``/boot/modules``, so that ``/boot`` carries each kernel with its modules. With a
separate ``/boot``, ``/lib/modules`` points nowhere until ``/boot`` is mounted, while udev loads the
drivers of coldplugged devices before that; a small systemd unit (``BOOT_MODULES_UNIT``) loads what
was missed once ``/boot`` is mounted, before ``sysinit.target``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vimgtools.boot import Bootloader
from vimgtools.errors import BootloaderError, ImageRefused, InvalidInput, KernelError, VimgError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.steps import (
    InstallModules,
    Mkdir,
    Move,
    RemoveDir,
    RunCommand,
    SetDefault,
    Step,
    Symlink,
    Upload,
    Write,
)
from vimgtools.kernel import Kernel, initramfs_has

MODULES_HOME = "/boot/modules"
STATE_FILE = "/boot/vimgtools/rekernel.json"
MiB = 1 << 20
# When the initramfs is regenerated in the guest, room to keep for it (Debian's is 30-60 MiB).
INITRAMFS_ESTIMATE = 64 * MiB
SPACE_MARGIN = 4 * MiB

# Drivers the new kernel needs to mount the guest's root on the target hypervisor.
DISK_DRIVERS = {
    "kvm": (
        ("CONFIG_VIRTIO_PCI", "virtio_pci"),
        ("CONFIG_VIRTIO_BLK", "virtio_blk"),
        ("CONFIG_SCSI_VIRTIO", "virtio_scsi"),
    ),
    "xen": (("CONFIG_XEN_BLKDEV_FRONTEND", "xen-blkfront"),),
}
FS_DRIVERS = {
    "ext4": ("CONFIG_EXT4_FS", "ext4"),
    "ext3": ("CONFIG_EXT4_FS", "ext4"),
    "ext2": ("CONFIG_EXT2_FS", "ext2"),
    "xfs": ("CONFIG_XFS_FS", "xfs"),
    "btrfs": ("CONFIG_BTRFS_FS", "btrfs"),
}

BOOT_MODULES_UNIT_NAME = "vimgtools-boot-modules.service"
BOOT_MODULES_UNIT = f"""# Installed by vimgtools rekernel. /lib/modules is a symlink to {MODULES_HOME}
# on a separate /boot: udev coldplug and systemd's early module loaders run before /boot is
# mounted and miss their
# drivers. Once /boot is mounted, create the static device nodes, load what they wanted, and
# replay the udev "add" events so that every device gets its driver.
[Unit]
Description=Load kernel modules missed while /boot (which holds /lib/modules) was not mounted
DefaultDependencies=no
RequiresMountsFor={MODULES_HOME}
After=systemd-udev-trigger.service local-fs.target
Before=sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=-/bin/kmod static-nodes --format=tmpfiles --output=/run/tmpfiles.d/static-nodes.conf
ExecStart=-/bin/systemd-tmpfiles --prefix=/dev --create --boot
ExecStart=-/sbin/modprobe -a -q configfs dm_mod drm efi_pstore fuse loop
ExecStart=-/lib/systemd/systemd-modules-load
ExecStart=/bin/udevadm trigger --action=add
ExecStart=-/bin/udevadm settle --timeout=60

[Install]
WantedBy=sysinit.target
"""


Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Check:
    """One preflight check and what a failure does.

    A failed ``error`` refuses; a failed ``warning`` refuses unless ``--force``; either refuses by
    raising ``refuses_as`` (its exit code: 2, nothing was changed). A check with ``refuses_as=None``
    only reports (``replace``: the version is already in /boot and is replaced).
    """

    name: str
    ok: bool
    message: str
    severity: Severity = "error"
    refuses_as: type[VimgError] | None = KernelError

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "severity": self.severity,
            "message": self.message,
            "refuses_as": self.refuses_as.__name__ if self.refuses_as else None,
        }


@dataclass
class Options:
    """What the caller chose (CLI flags, library keywords)."""

    target: str = "kvm"  # "kvm" or "xen"
    force: bool = False
    regenerate_initramfs: bool | None = None  # None: only when BOOTDIR has none


@dataclass(frozen=True)
class Plan:
    """Everything a run will do to one guest (a rekernel or a rollback), decided before anything changes."""

    disk: str
    root: str
    version: str  # the kernel the guest boots by default afterwards
    previous: str | None  # the kernel the guest boots by default now
    loader: str
    initramfs: str  # "supplied", "regenerate:<tool>", or "unchanged" (rollback)
    checks: tuple[Check, ...]
    steps: tuple[Step, ...]
    facts: dict[str, Any] = field(default_factory=dict)
    action: str = "rekernel"  # or "rollback"
    initramfs_modules: tuple[str, ...] = ()  # drivers the initramfs must carry (modules, not built in)
    retarget: dict[str, Any] = field(default_factory=dict)  # Xen -> KVM: inventory, rewrites (rekernel.xen)
    disks: dict[str, str] = field(default_factory=dict)  # several DISKs: /dev/sda -> the first DISK, ...
    # A shared system disk (rekernel.shared): the DISK each step lands on, decided with the guest view
    # it runs in (steps run in several guests' views, so a step alone does not say), and the run's
    # shared-disk facts (the guests, where /lib/modules resolves in each, the command line's root=).
    step_disks: tuple[str | None, ...] = ()
    shared: dict[str, Any] = field(default_factory=dict)

    def where(self, index: int, step: Step) -> str | None:
        """Which DISK the step at ``index`` (from 0) of ``steps`` changes (several DISKs only)."""
        if self.step_disks:
            return self.step_disks[index]
        return self.disk_of(step)

    def disk_of(self, step: Step) -> str | None:
        """Which DISK a step changes (several DISKs only): by the mountpoint its path is under."""
        if len(self.disks) < 2:
            return None
        path = next(
            (getattr(step, a) for a in ("path", "dst", "link") if isinstance(getattr(step, a, None), str)),
            None,
        )
        if isinstance(step, RunCommand):
            dev = next((a for a in step.argv[1:] if a.startswith("/dev/")), None)
            if dev:
                return self.disks.get(_whole_disk(dev))
            path = "/"
        mps: dict[str, str] = self.facts.get("mountpoints", {})
        if path is None or not mps:
            return None
        mp = max((m for m in mps if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default="/")
        return self.disks.get(_whole_disk(mps.get(mp, "")))

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "warning"]

    def refusal(self, *, force: bool = False) -> VimgError | None:
        """The exception that refuses this plan, or None to go on.

        Failed errors refuse; failed warnings too unless ``force``; the first one's ``refuses_as``
        is the class raised, the message lists them all.
        """
        errors = [c for c in self.errors if c.refuses_as is not None]
        warnings = [c for c in self.warnings if c.refuses_as is not None]
        if not errors and (force or not warnings):
            return None
        bad = errors or warnings
        text = "; ".join(f"{c.name}: {c.message}" for c in bad)
        if not errors:
            text += " (warnings: --force to go on)"
        cls = bad[0].refuses_as
        assert cls is not None
        return cls(f"{self.disk}: preflight: {text}")

    def describe(self, *, diffs: bool = False) -> str:
        lines = [
            f"{self.action} {self.disk} ({self.root}): {self.previous or '?'} -> {self.version}",
            f"  bootloader {self.loader}; initramfs {self.initramfs}",
        ]
        if self.shared.get("initramfs"):
            lines.append(f"  initramfs for every guest: {self.shared['initramfs']['describe']}")
        for old, new in self.shared.get("maps", {}).items():
            lines.append(f"  --map {old} -> {new}")
        if self.retarget.get("xen"):
            lines.append(f"  retarget to KVM: {'; '.join(self.retarget.get('markers', []))}")
            for old, new in self.retarget.get("rewrites", {}).items():
                lines.append(f"    {old} -> {new or 'UNRESOLVED'}")
        lines.append("  checks:")
        for c in self.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.severity == "error" else "WARN")
            lines.append(f"    [{mark}] {c.name}: {c.message}")
        lines.append("  steps:")
        for i, s in enumerate(self.steps, 1):
            where = self.where(i - 1, s)
            lines.append(f"    {i:2}. {s.describe()}" + (f"  [on {where}]" if where else ""))
            if diffs and isinstance(s, Write) and s.old is not None:
                lines.extend("        " + d for d in s.diff().splitlines())
        return "\n".join(lines)

    def _step_dict(self, index: int, s: Step) -> dict[str, Any]:
        out: dict[str, Any] = {"op": type(s).__name__, "describe": s.describe()}
        if isinstance(s, Write) and s.old is not None:
            out["diff"] = s.diff()
        if len(self.disks) > 1:
            out["disk"] = self.where(index, s)
        return out

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "action": self.action,
                "disk": self.disk,
                "root": self.root,
                "version": self.version,
                "previous": self.previous,
                "loader": self.loader,
                "initramfs": self.initramfs,
                "initramfs_modules": list(self.initramfs_modules),
                "checks": [c.to_dict() for c in self.checks],
                "steps": [self._step_dict(i, s) for i, s in enumerate(self.steps)],
                "facts": self.facts,
            }
            | ({"retarget": self.retarget} if self.retarget else {})
            | ({"disks": self.disks} if self.disks else {})
            | ({"shared": self.shared} if self.shared else {})
        )


def _whole_disk(dev: str) -> str:
    m = re.match(r"(/dev/[shv]d[a-z]+)\d*$", dev) or re.match(r"(/dev/nvme\d+n\d+)(p\d+)?$", dev)
    return m.group(1) if m else dev


def version_of(kernel_path: str) -> str | None:
    """``/boot/vmlinuz-VER`` -> ``VER`` (None when the name is not ``vmlinuz-*``)."""
    base = kernel_path.rsplit("/", 1)[-1]
    return base[len("vmlinuz-") :] if base.startswith("vmlinuz-") else None


def wanted_drivers(facts: GuestFacts, target: str) -> list[tuple[str, str]]:
    """(config symbol, module) of the drivers needed to mount the guest's root on ``target``."""
    wanted = list(DISK_DRIVERS.get(target, ()))
    fs = FS_DRIVERS.get(facts.fs_types.get("/", "unknown"))
    if fs:
        wanted.append(fs)
    return wanted


def initramfs_tool(facts: GuestFacts, version: str) -> tuple[str, ...] | None:
    """The guest's own initramfs command for ``version`` (the appliance's uname -r is not the guest's)."""
    if t := facts.has_tool("update-initramfs"):
        return (t, "-c", "-k", version)
    if t := facts.has_tool("dracut"):
        return (t, "-f", f"/boot/initramfs-{version}.img", version)
    if t := facts.has_tool("mkinitrd"):
        return (t, "-k", f"/boot/vmlinuz-{version}", "-i", f"/boot/initrd-{version}")
    return None


def space_check(facts: GuestFacts, kernel: Kernel, *, regenerate: bool, more_moved: int = 0) -> Check:
    """Room on the filesystem holding /boot: kernel files, new modules, initramfs, the module trees
    moved there (the guest's own, plus ``more_moved`` bytes of other guests' on a shared /boot)."""
    files = kernel.files_bytes
    mods = kernel.modules_bytes
    initrd = 0 if kernel.initramfs and not regenerate else INITRAMFS_ESTIMATE
    moved = more_moved
    if facts.boot_separate and not facts.modules_on_boot:
        moved += sum(size for v, size in facts.module_versions.items() if v != kernel.version)
    need = files + mods + initrd + moved + SPACE_MARGIN
    whose = "module trees moved" if more_moved else "guest's module trees moved"
    msg = (
        f"/boot has {facts.boot_free // MiB} MiB free, needs {need // MiB} MiB (kernel files {files // MiB}, "
        f"modules {mods // MiB}, initramfs {initrd // MiB}, {whose} {moved // MiB}, "
        f"margin {SPACE_MARGIN // MiB})"
    )
    fix = "" if need <= facts.boot_free else "; grow /boot or remove old kernels from it"
    return Check("space", need <= facts.boot_free, msg + fix, refuses_as=ImageRefused)


def preflight(
    facts: GuestFacts,
    kernel: Kernel,
    options: Options,
    *,
    initrd_files: list[str] | None,
    regenerate: bool,
) -> list[Check]:
    """The checks that must pass before anything changes (pure: everything comes in as data).

    Args:
        initrd_files: the supplied initramfs's file list (read on the host), or None when regenerating.
    """
    checks: list[Check] = []
    guest_arch = facts.arch
    same = guest_arch == kernel.arch or (guest_arch in ("i386", "i686") and kernel.arch == "i386")
    checks.append(
        Check(
            "arch", same, f"kernel {kernel.arch}, guest {guest_arch}" + ("" if same else ": they must match")
        )
    )
    checks.append(space_check(facts, kernel, regenerate=regenerate))
    # Drivers to mount the root on the target hypervisor.
    root_fs = facts.fs_types.get("/", "unknown")
    wanted = wanted_drivers(facts, options.target)
    if root_fs not in FS_DRIVERS:
        checks.append(Check("root-fs", False, f"root filesystem {root_fs}: driver not known", "warning"))
    for symbol, module in wanted:
        state = kernel.driver_state(symbol, module)
        if state == "missing":
            checks.append(
                Check(
                    f"driver:{module}",
                    False,
                    f"{symbol} is neither built in nor a module of {kernel.version}",
                )
            )
        elif state == "builtin":
            checks.append(Check(f"driver:{module}", True, "built in"))
        elif initrd_files is None:
            checks.append(
                Check(
                    f"driver:{module}", True, "module; the regenerated initramfs is checked after it is made"
                )
            )
        elif not regenerate and kernel.initramfs is None:
            checks.append(
                Check(
                    f"driver:{module}",
                    False,
                    "a module, and there is no initramfs to load it before the root is mounted: put one in "
                    "BOOTDIR or let the guest make one (no --no-regenerate-initramfs)",
                )
            )
        else:
            found = initramfs_has(initrd_files, module)
            checks.append(
                Check(
                    f"driver:{module}",
                    found,
                    "module, in the supplied initramfs"
                    if found
                    else f"module, but the supplied initramfs lacks {module}.ko: rebuild it with the driver, "
                    "or leave it out of BOOTDIR to regenerate one in the guest",
                )
            )
    if regenerate:
        tool = initramfs_tool(facts, kernel.version)
        checks.append(
            Check(
                "initramfs-tool",
                tool is not None,
                f"{tool[0]}"
                if tool
                else "the guest has no update-initramfs, dracut or mkinitrd: put an initramfs in BOOTDIR",
            )
        )
        if tool and "update-initramfs" in tool[0] and kernel.config is None:
            checks.append(
                Check(
                    "config",
                    False,
                    f"update-initramfs needs /boot/config-{kernel.version}: "
                    f"put config-{kernel.version} in BOOTDIR",
                )
            )
    code = facts.boot_code
    checks.append(
        Check(
            "boot-code",
            code is not None,
            f"sector 0 holds {code} boot code"
            if code
            else "no boot code in sector 0: the guest must be booted another way (direct kernel boot, "
            "a loader on another disk); --force to go on",
            "warning",
            refuses_as=BootloaderError,
        )
    )
    if kernel.version in facts.boot_kernels:
        checks.append(
            Check(
                "replace",
                False,
                f"/boot/vmlinuz-{kernel.version} exists and is replaced",
                "warning",
                refuses_as=None,
            )
        )
    return checks


def plan_rekernel(
    facts: GuestFacts,
    kernel: Kernel,
    loader: Bootloader,
    *,
    disk: str,
    previous: str | None,
    options: Options,
    initrd_files: list[str] | None,
    make_initramfs: tuple[Step, ...] | None = None,
) -> Plan:
    """Decide the checks and the steps. Pure: the caller gathered ``facts`` and ``initrd_files``.

    Args:
        make_initramfs: when regenerating, the steps that make ``/boot/initrd.img-VER`` instead of
            the guest's own tool (a shared system disk's generic one, ``rekernel.shared``); its
            ``initramfs`` is then ``regenerate:`` and the basename of their first command.
    """
    v = kernel.version
    regenerate = (
        options.regenerate_initramfs if options.regenerate_initramfs is not None else not kernel.initramfs
    )
    if not regenerate:
        initrd_files = initrd_files or []
    checks = preflight(
        facts, kernel, options, initrd_files=None if regenerate else initrd_files, regenerate=regenerate
    )
    steps: list[Step] = [Mkdir("/boot")]
    for src, name in kernel.files():
        if name.startswith("initrd") and regenerate:
            continue
        steps.append(Upload(str(src), f"/boot/{name}"))
    # The modules convention.
    if not facts.modules_on_boot:
        steps.append(Mkdir(MODULES_HOME))
        for old in sorted(facts.module_versions):
            if old != v:
                steps.append(Move(f"{facts.modules_path}/{old}", f"{MODULES_HOME}/{old}"))
        link = facts.modules_path  # the real directory: /usr/lib/modules with usrmerge
        if v in facts.module_versions:
            steps.append(RunCommand(("rm", "-rf", f"{link}/{v}"), "replaced by the new tree"))
        steps.append(RemoveDir(link))
        steps.append(Symlink(MODULES_HOME, link))
    steps.append(InstallModules(str(kernel.modules_dir), f"{MODULES_HOME}/{v}", v))
    if facts.boot_separate:
        unit = f"/etc/systemd/system/{BOOT_MODULES_UNIT_NAME}"
        steps.append(Write(unit, BOOT_MODULES_UNIT, facts.text(unit)))
        steps.append(Mkdir("/etc/systemd/system/sysinit.target.wants"))
        steps.append(Symlink(unit, f"/etc/systemd/system/sysinit.target.wants/{BOOT_MODULES_UNIT_NAME}"))
    initramfs = "supplied"
    if regenerate and make_initramfs is not None:
        steps.extend(make_initramfs)
        first = next((s.argv[0] for s in make_initramfs if isinstance(s, RunCommand)), "none")
        initramfs = "regenerate:" + first.rsplit("/", 1)[-1]
    elif regenerate:
        tool = initramfs_tool(facts, v)
        if tool:
            if v in facts.boot_kernels:
                steps.append(RunCommand(("rm", "-f", f"/boot/initrd.img-{v}", f"/boot/initramfs-{v}.img")))
            steps.append(RunCommand(tool, "make the initramfs with the guest's own tool"))
            initramfs = "regenerate:" + tool[0].rsplit("/", 1)[-1]
        else:
            initramfs = "regenerate:none"
    steps.extend(loader.steps(facts, v, initrd=regenerate or kernel.initramfs is not None))
    state = {"version": v, "previous": previous, "loader": loader.name, "tool": "vimgtools.rekernel"}
    steps.append(Mkdir("/boot/vimgtools"))
    steps.append(
        Write(STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n", facts.text(STATE_FILE))
    )
    if facts.selinux == "enforcing":
        steps.append(Write("/.autorelabel", "", None))
    return Plan(
        disk=disk,
        root=facts.root,
        version=v,
        previous=previous,
        loader=loader.name,
        initramfs=initramfs,
        checks=tuple(checks),
        steps=tuple(steps),
        facts=facts.summary(),
        initramfs_modules=tuple(
            module
            for symbol, module in wanted_drivers(facts, options.target)
            if kernel.driver_state(symbol, module) == "module"
        ),
    )


def plan_rollback(facts: GuestFacts, loader: Bootloader, *, disk: str) -> Plan:
    """Make the kernel the guest booted before the last rekernel its default again (``STATE_FILE``).

    The state file must be in ``facts.files`` (``collect_facts(..., extra_files=(STATE_FILE,))``).
    Refused (InvalidInput) when the guest was not rekernelled by vimgtools or its previous kernel is gone.
    """
    text = facts.text(STATE_FILE)
    checks: list[Check] = []
    state: dict[str, Any] = {}
    if text is None:
        checks.append(
            Check(
                "state",
                False,
                f"no {STATE_FILE}: this guest was not rekernelled by vimgtools",
                refuses_as=InvalidInput,
            )
        )
    else:
        try:
            loaded = json.loads(text)
        except ValueError as e:
            loaded = None
            checks.append(Check("state", False, f"{STATE_FILE}: not JSON ({e})", refuses_as=InvalidInput))
        if isinstance(loaded, dict):
            state = loaded
            checks.append(Check("state", True, f"{STATE_FILE}, written by {state.get('tool', '?')}"))
        elif loaded is not None:
            checks.append(Check("state", False, f"{STATE_FILE}: not a JSON object", refuses_as=InvalidInput))
    previous, current = state.get("previous"), state.get("version")
    steps: list[Step] = []
    if state and not previous:
        checks.append(
            Check("previous", False, f"{STATE_FILE} does not name a previous kernel", refuses_as=InvalidInput)
        )
    elif previous:
        there = previous in facts.boot_kernels
        checks.append(
            Check(
                "previous",
                there,
                f"/boot/vmlinuz-{previous} " + ("is there" if there else "is gone"),
                refuses_as=InvalidInput,
            )
        )
        new_state = {**state, "version": previous, "previous": current}
        steps = [
            SetDefault(loader.name, previous),
            Write(STATE_FILE, json.dumps(new_state, indent=1, sort_keys=True) + "\n", text),
        ]
    return Plan(
        disk=disk,
        root=facts.root,
        version=previous or "?",
        previous=current,
        loader=loader.name,
        initramfs="unchanged",
        checks=tuple(checks),
        steps=tuple(steps),
        facts=facts.summary(),
        action="rollback",
    )
