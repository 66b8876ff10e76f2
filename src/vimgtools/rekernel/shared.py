"""A shared system disk: one kernel, its modules and a generic initramfs on SYSTEM for every guest.

``rekernel SYSTEM --from BOOTDIR --guest ROOT1 --guest ROOT2``: guests each with a root disk of its
own that all mount ``/boot`` and ``/usr`` from one shared, read-only SYSTEM disk (as guests on a
Xen host often did). One appliance on every disk (SYSTEM is ``/dev/sda``, then each ROOT), an
overlay each, committed all or none (``rekernel.group``). Each guest sees its own ROOT first and
SYSTEM second (``xvda``/``vda``, ``xvdb``/``vdb``); its *view* — its root, and what its fstab mounts
from either disk — is mounted in turn by ``MountView`` steps, and every step of the plan names the
disk it lands on.

What goes where:

- on SYSTEM, once (run in the first guest's view): the kernel files and the initramfs (supplied or
  generated, below) in ``/boot``, the modules in ``/boot/modules/VER``, ``/usr/lib/modules`` (the shared ``/usr``) made a
  symlink to ``/boot/modules`` (the old trees moved there first), the loader's entry, whose command
  line serves every guest (Xen names become positional: ``root=/dev/xvda1`` -> ``root=/dev/vda1``,
  each guest's own first disk; ``console=hvc0`` -> tty0 + ttyS0), the state file;
- on each ROOT: that guest's own files: the Xen -> KVM edits (fstab by ``UUID=``, the Xen console's
  getty, the initramfs module lists, the NIC's ``.link``), and the unit that loads the drivers udev
  missed while ``/boot`` (which holds ``/lib/modules``) was not mounted.

``--map OLD=NEW`` (``shared_maps``): NEW is one of the two disks each guest sees (``/dev/sda`` its
ROOT, ``/dev/sdb`` SYSTEM); in a guest's view OLD names that guest's disk, in SYSTEM's command lines
it becomes positional like a Xen name.

The modules link. With usrmerge ``/lib`` is ``usr/lib`` on each guest's root, so ``/lib/modules`` is
``/usr/lib/modules`` on the shared ``/usr``: the link lives there, once, for every such guest. It is
absolute (``/boot/modules``), so each guest resolves it in its own mount namespace: ``/usr`` is
mounted by the initramfs (initramfs-tools mounts ``/usr`` from the root's fstab before switching
root), ``/boot`` by systemd from the guest's fstab; the drivers needed before that (disk and
filesystem drivers of ``/`` and ``/usr``) are in the initramfs under its own ``/lib/modules``, and
``vimgtools-boot-modules.service`` on each guest's root loads what udev coldplug wanted before
``/boot`` was mounted. Without usrmerge a guest has a ``/lib`` of its own: its link is
``/lib/modules`` on its ROOT, one per such guest, resolved the same way. Each place a link goes
gives up its module trees: the first holding a version moves it to ``/boot/modules``, a later
guest's tree of that version is kept on its own disk (``KEPT_MODULES``; a warning when the sizes
differ). Checked per guest before any change (``/boot`` and ``/usr`` in its fstab are
SYSTEM's filesystems, ``/lib/modules`` resolves to the shared ``/usr/lib/modules``, to its own
``/lib/modules`` without usrmerge, or already to ``/boot/modules``) and after, re-reading each
guest's view (``/lib/modules/VER`` resolves to ``/boot/modules/VER`` with ``modules.dep``, the unit
is there, the default entry boots VER with a ``root=`` that names that guest's root).

The initramfs, one for every guest: generic (not initramfs-tools ``MODULES=dep``, made for the
drivers of the machine it is made on), carrying the disk drivers and the filesystem drivers of every
guest's ``/`` and ``/usr`` that the kernel has as modules (``guest_drivers``), made for the kernel,
with no ``/dev/xvd`` baked in (``check_shared_initramfs``). The contract is the single-disk one's:

- BOOTDIR's, when it has one: listed and unpacked on the host and checked before any change;
- generated, when BOOTDIR has none or with ``--regenerate-initramfs`` (then BOOTDIR's is not used;
  ``--no-regenerate-initramfs`` refuses a BOOTDIR without one): in the first guest's view, after the
  modules are in ``/boot/modules/VER`` and ``/usr/lib/modules`` links there, by
  ``mkinitramfs -d /boot/vimgtools/initramfs-tools -o /boot/initrd.img-VER VER`` with a configuration
  of its own on SYSTEM (the first guest's ``initramfs.conf`` with ``MODULES=list`` and
  ``RESUME=none``, ``modules`` listing every guest's drivers; ``generic_conf``), so that no guest's
  ``MODULES=``, resume device or update-initramfs state is involved (dracut: ``--no-hostonly
  --force-drivers``; unit-tested only). Its scratch goes to that guest's ``/var/tmp``. After it is
  made, verify downloads it and checks it on the host with the same checks (``verify_initramfs``).

GRUB 2 on the shared ``/boot`` is refused: ``update-grub`` writes the ``root=UUID=`` of the guest it
runs in. extlinux and GRUB legacy configurations are edited directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vimgtools.boot import Bootloader, detect
from vimgtools.errors import BootloaderError, GuestError, InvalidInput
from vimgtools.guest.facts import GuestFacts, collect_facts
from vimgtools.guest.inventory import Filesystem, Inventory, collect_inventory, read_filesystems
from vimgtools.guest.protocol import Guest
from vimgtools.guest.steps import Mkdir, MountView, Move, RemoveDir, RunCommand, Step, Symlink, Write
from vimgtools.kernel import Kernel, find_kernel, initramfs_has, initramfs_texts, list_initramfs
from vimgtools.rekernel.apply import apply_plan, verify, verify_rollback
from vimgtools.rekernel.plan import (
    BOOT_MODULES_UNIT_NAME,
    DISK_DRIVERS,
    FS_DRIVERS,
    MODULES_HOME,
    STATE_FILE,
    Check,
    MiB,
    Options,
    Plan,
    plan_rekernel,
    plan_rollback,
    space_check,
    version_of,
)
from vimgtools.rekernel.retargeting import as_disks, disk_map, verify_retarget
from vimgtools.rekernel.session import Result, disks_session
from vimgtools.rekernel.xen import (
    CMDLINE_FILES,
    Resolver,
    RetargetOptions,
    edit_cmdline_file,
    parse_maps,
    plan_xen,
)

log = logging.getLogger("vimgtools.rekernel")

SYSTEM_DEV = "/dev/sda"  # SYSTEM is the appliance's first disk, the guests' ROOTs follow
MODULES_LINK = "/usr/lib/modules"
SKIP_FS = frozenset({"swap", "proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "nfs", "nfs4", "cifs", "none"})
UNIT = f"/etc/systemd/system/{BOOT_MODULES_UNIT_NAME}"
UNIT_WANTS = f"/etc/systemd/system/sysinit.target.wants/{BOOT_MODULES_UNIT_NAME}"


@dataclass(frozen=True)
class View:
    """How one guest sees the disks: its root, its mounts, its disk names."""

    guest: str  # the guest's ROOT image, as given
    disk: str  # the appliance's name for it (/dev/sdb, ...)
    root: str  # the appliance device of its root filesystem
    mountpoints: dict[str, str]  # guest mountpoint -> appliance device
    maps: tuple[tuple[str, str], ...]  # the guest's disk names -> appliance disks

    @property
    def name(self) -> str:
        return os.path.basename(self.guest)


@dataclass(frozen=True)
class GuestState:
    """One guest as read in its view, before any change."""

    view: View
    facts: GuestFacts
    inv: Inventory


Maps = tuple[tuple[str, str], ...]
MAP_NEW = re.compile(r"/dev/(?:xvd|vd|sd|hd)([ab])")


def shared_maps(items: Iterable[str]) -> Maps:
    """``--map OLD=NEW`` with ``--guest``: NEW is one of the guest's two disks *as it sees them*, its
    ROOT first (``/dev/vda``; ``/dev/sda`` and ``/dev/xvda`` say the same) and SYSTEM second
    (``/dev/vdb``); returned as ``(OLD, /dev/vdX)``, the KVM name (pure).

    Raises:
        InvalidInput: not ``OLD=NEW``, or NEW is not one of those two disks (exit 2, before any change).
    """
    out = []
    for old, new in parse_maps(items):
        m = MAP_NEW.fullmatch(new)
        if m is None:
            raise InvalidInput(
                f"--map {old}={new}: with --guest NEW is one of the two disks each guest sees: "
                "/dev/sda (its own ROOT) or /dev/sdb (the shared system disk)"
            )
        out.append((old, f"/dev/vd{m.group(1)}"))
    return tuple(out)


def guest_maps(disk: str, user: Maps = ()) -> Maps:
    """A guest's own disk names -> the appliance's disks: its ROOT first (xvda, vda), SYSTEM second
    (xvdb, vdb); ``user`` (``shared_maps``) before them."""
    own = {"/dev/vda": disk, "/dev/vdb": SYSTEM_DEV}
    return (
        *((old, own[new]) for old, new in user),
        ("/dev/xvda", disk),
        ("/dev/xvdb", SYSTEM_DEV),
        ("/dev/vda", disk),
        ("/dev/vdb", SYSTEM_DEV),
    )


def whole_disk(dev: str) -> str:
    m = re.match(r"(/dev/[shv]d[a-z]+)\d*$", dev) or re.match(r"(/dev/nvme\d+n\d+)(p\d+)?$", dev)
    return m.group(1) if m else dev


def resolve_spec(
    spec: str, maps: tuple[tuple[str, str], ...], filesystems: dict[str, Filesystem], disks: set[str]
) -> str | None:
    """The appliance device an fstab or ``root=`` spec names in one guest's view (its ``disks``), or None.

    ``UUID=`` and ``LABEL=`` must name exactly one filesystem on the guest's own disks; a device name
    is one of the guest's disk names (``maps``) plus a partition number.
    """
    mine = [f for f in filesystems.values() if whole_disk(f.device) in disks]
    for key, attr in (("UUID=", "uuid"), ("LABEL=", "label")):
        if spec.startswith(key):
            want = spec[len(key) :].strip("\"'")
            found = [f for f in mine if getattr(f, attr) and getattr(f, attr).lower() == want.lower()]
            return found[0].device if len(found) == 1 else None
    for old, new in sorted(maps, key=lambda m: -len(m[0])):
        if spec == old or (spec.startswith(old) and re.fullmatch(r"p?\d+", spec[len(old) :])):
            dev = new + spec[len(old) :].lstrip("p")
            return dev if dev in filesystems else None
    return None


def find_view(
    gi: Guest,
    roots: list[str],
    guest: str,
    disk: str,
    filesystems: dict[str, Filesystem],
    user_maps: Maps = (),
) -> View:
    """Find the guest's root on its disk and what its fstab mounts (the guest is left mounted at /).

    ``user_maps``: ``--map`` (``shared_maps``), device names of the guest's besides xvd and vd.

    Raises:
        InvalidInput: no root or several on the guest's disk, no fstab, or an fstab entry that names
            no filesystem on the guest's disks (not ``nofail``/``noauto``); the message names the image.
    """
    mine = [r for r in roots if whole_disk(r) == disk]
    if not mine:
        raise InvalidInput(f"{guest}: no operating system found on it (no root filesystem with /etc)")
    if len(mine) > 1:
        raise InvalidInput(f"{guest}: several systems on it ({', '.join(mine)}): one root per guest disk")
    root = mine[0]
    maps = guest_maps(disk, user_maps)
    gi.mount_view({"/": root})
    fstab = gi.text("/etc/fstab")
    if fstab is None:
        raise InvalidInput(f"{guest}: {root} has no /etc/fstab")
    mps = {"/": root}
    for line in fstab.splitlines():
        w = line.split()
        if not w or w[0].startswith("#") or len(w) < 3:
            continue
        spec, mp, fstype = w[0], w[1], w[2]
        opts = w[3].split(",") if len(w) > 3 else []
        if mp == "/" or not mp.startswith("/") or fstype in SKIP_FS:
            continue
        dev = resolve_spec(spec, maps, filesystems, {disk, SYSTEM_DEV})
        if dev is None:
            if "nofail" in opts or "noauto" in opts:
                continue
            raise InvalidInput(
                f"{guest}: /etc/fstab: {spec} ({mp}) names no filesystem on {guest} or the system disk"
            )
        mps[mp] = dev
    return View(guest, disk, root, mps, maps)


class PositionalResolver(Resolver):
    """Xen disk names in a command line every guest shares: ``/dev/xvdXN`` -> ``/dev/vdXN``, and the
    names under ``--map`` (``shared_maps``: OLD -> ``/dev/vda`` or ``/dev/vdb``) the same way.

    A ``UUID=`` names one guest's root only; the guest's own first disk is ``vda`` in each of them.
    """

    xvd_as = "/dev/vd"

    def resolve(self, spec: str) -> tuple[str | None, str]:
        dev = self.device(spec)
        return (dev, "the guest's own disk, by position") if dev else (spec, "kept")


def cmdline_roots(files: dict[str, str]) -> list[tuple[str, str]]:
    """(file, root= value) of every kernel command line in loader configuration files."""
    out: list[tuple[str, str]] = []
    for path, text in sorted(files.items()):
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            if re.match(r"\s*(append|kernel|linux\w*|options|GRUB_CMDLINE_LINUX\w*=)", line, re.I):
                out.extend((path, m.group(1).strip("\"'")) for m in re.finditer(r"\broot=(\S+)", line))
    return out


def _step_disk(step: Step, view: View, disks: dict[str, str]) -> str | None:
    """The DISK a step run in ``view`` lands on: by the mountpoint of its path (a command: its first
    absolute path argument, a device argument's disk)."""
    if isinstance(step, MountView):
        return None
    path = next(
        (getattr(step, a) for a in ("path", "dst", "link") if isinstance(getattr(step, a, None), str)), None
    )
    if isinstance(step, RunCommand):
        args = [a.split("=", 1)[-1] for a in step.argv[1:]]
        dev = next((a for a in args if a.startswith("/dev/")), None)
        if dev:
            return disks.get(whole_disk(dev))
        path = next((a for a in args if a.startswith("/")), "/")
    if path is None:
        return None
    mps = view.mountpoints
    mp = max((m for m in mps if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default="/")
    return disks.get(whole_disk(mps.get(mp, "")))


def _per_guest(c: Check, view: View) -> Check:
    return dataclasses.replace(c, name=f"{c.name}:{view.name}", message=f"{view.guest}: {c.message}")


def check_root_specs(
    roots: list[tuple[str, str]], state: GuestState, filesystems: dict[str, Filesystem], system: str
) -> Check:
    """Every ``root=`` of the shared command lines names this guest's own root in its view."""
    v = state.view
    if not roots:
        return Check(
            f"cmdline-root:{v.name}", False, f"{v.guest}: no root= in {system}'s loader configuration"
        )
    bad = []
    for path, spec in roots:
        dev = resolve_spec(spec, v.maps, filesystems, {v.disk, SYSTEM_DEV})
        if dev != v.root:
            bad.append(f"{path}: root={spec} names {dev or 'nothing'} there, not its root {v.root}")
    if bad:
        return Check(
            f"cmdline-root:{v.name}",
            False,
            f"{v.guest}: " + "; ".join(bad) + " (a command line every guest shares needs root=/dev/vdaN, "
            "each guest's own first disk, a LABEL= that every guest's root carries, or --map OLD=/dev/sda for the "
            "name it uses)",
            refuses_as=InvalidInput,
        )
    specs = sorted({s for _p, s in roots})
    return Check(f"cmdline-root:{v.name}", True, f"{v.guest}: root={', '.join(specs)} is {v.root}, its root")


GENERIC_CONF = "/boot/vimgtools/initramfs-tools"  # on SYSTEM: the configuration the generic one is made from
GENERIC_CONF_FILES = (f"{GENERIC_CONF}/initramfs.conf", f"{GENERIC_CONF}/modules")
GENERIC_HEADER = (
    "# Written by vimgtools rekernel: the configuration of the generic initramfs that every guest\n"
    "# of this shared system disk boots, made by mkinitramfs -d {conf}:\n"
    "# MODULES=list, the disk and filesystem drivers of every guest's / and /usr (not MODULES=dep:\n"
    "# the drivers of the machine it is made on).\n"
)


def guest_drivers(facts: GuestFacts, kernel: Kernel, target: str) -> tuple[list[str], list[str]]:
    """(modules an initramfs must carry, drivers the kernel has neither built in nor as a module) for
    one guest's ``/`` and ``/usr`` on ``target``: the disk drivers and the filesystem drivers."""
    wanted = list(DISK_DRIVERS.get(target, ()))
    for mp in ("/", "/usr"):
        fs = FS_DRIVERS.get(facts.fs_types.get(mp, ""))
        if fs and fs not in wanted:
            wanted.append(fs)
    modules: list[str] = []
    absent: list[str] = []
    for symbol, module in wanted:
        state = kernel.driver_state(symbol, module)
        if state == "module":
            modules.append(module)
        elif state == "missing":
            absent.append(f"{module} ({symbol} not in {kernel.version})")
    return modules, absent


def check_shared_initramfs(
    states: Sequence[GuestState], kernel: Kernel, target: str, files: list[str], texts: dict[str, str]
) -> list[Check]:
    """An initramfs as listed and unpacked on the host (``list_initramfs``, ``initramfs_texts``), checked
    for every guest: not host-only, made for the kernel, each guest's drivers in it, no Xen disk name
    baked in. The same checks refuse a supplied one before any change and fail the verify of a
    generated one (pure)."""
    fix = "make it with MODULES=most or a list elsewhere, or --regenerate-initramfs to generate a generic one"
    conf = texts.get("conf/initramfs.conf", "")
    m = re.search(r"^\s*MODULES=(\w+)", conf, re.M)
    mode = m.group(1) if m else None
    checks = [
        Check(
            "initramfs-generic",
            mode != "dep",
            "initramfs-tools MODULES=dep: made host-only, for the drivers of the machine it was made on; "
            + fix
            if mode == "dep"
            else f"not host-only ({'MODULES=' + mode if mode else 'no initramfs-tools MODULES='})",
        )
    ]
    v = kernel.version
    mine = any(f"lib/modules/{v}/" in f for f in files)
    checks.append(
        Check(
            "initramfs-version",
            mine,
            f"carries modules of {v}" if mine else f"carries no lib/modules/{v}: made for another kernel",
        )
    )
    for s in states:
        modules, absent = guest_drivers(s.facts, kernel, target)
        missing = [m for m in modules if not initramfs_has(files, m)] + absent
        checks.append(
            Check(
                f"initramfs-drivers:{s.view.name}",
                not missing,
                f"{s.view.guest}: the initramfs lacks {', '.join(missing)}; {fix}"
                if missing
                else f"{s.view.guest}: the drivers of / and /usr on {target} are in the initramfs or built in",
            )
        )
    baked = [p for p, t in texts.items() if "/dev/xvd" in t]
    checks.append(
        Check(
            "initramfs-config",
            not baked,
            f"its baked-in configuration names /dev/xvd ({', '.join(baked)}); {fix}"
            if baked
            else "no /dev/xvd in its baked-in configuration",
        )
    )
    return checks


def generic_conf(guest_conf: str | None) -> str:
    """``initramfs.conf`` of the generic initramfs: the first guest's own, with ``MODULES=list`` and
    ``RESUME=none`` (a resume device is one guest's) instead of what it says (pure)."""
    kept = [
        ln
        for ln in (guest_conf or "").splitlines()
        if not re.match(r"\s*(MODULES|RESUME)=", ln) and not ln.lstrip().startswith("#") and ln.strip()
    ]
    have = {ln.split("=", 1)[0].strip() for ln in kept if "=" in ln}
    defaults = [f"{k}={v}" for k, v in (("BUSYBOX", "auto"), ("COMPRESS", "gzip")) if k not in have]
    return (
        GENERIC_HEADER.format(conf=GENERIC_CONF)
        + "\n".join([*kept, *defaults, "MODULES=list", "RESUME=none"])
        + "\n"
    )


def plan_generic_initramfs(
    first: GuestState, kernel: Kernel, modules: list[str], target: str
) -> tuple[list[Check], tuple[Step, ...], dict[str, Any]]:
    """The checks and steps that make the generic initramfs on SYSTEM in the first guest's view (pure).

    initramfs-tools: ``mkinitramfs -d GENERIC_CONF`` with a configuration of its own on SYSTEM
    (``generic_conf``, ``modules`` listing every guest's drivers), so that neither the first guest's
    ``MODULES=`` nor its resume device nor its update-initramfs state is involved; dracut:
    ``--no-hostonly --force-drivers``. Either writes ``/boot/initrd.img-VER``.
    """
    facts, v = first.facts, kernel.version
    out = f"/boot/initrd.img-{v}"
    why = f"the generic initramfs for every guest, made in the view of {first.view.guest}"
    checks: list[Check] = []
    steps: tuple[Step, ...] = ()
    info: dict[str, Any] = {
        "source": "generated",
        "path": out,
        "modules": modules,
        "in_view_of": first.view.guest,
    }
    if mk := facts.has_tool("mkinitramfs"):
        listing = "".join(f"{m}\n" for m in modules)
        steps = (
            Mkdir(f"{GENERIC_CONF}/scripts"),  # mkinitramfs adds the scripts there (none)
            Write(
                f"{GENERIC_CONF}/initramfs.conf",
                generic_conf(first.inv.text("/etc/initramfs-tools/initramfs.conf")),
                facts.text(f"{GENERIC_CONF}/initramfs.conf"),
            ),
            Write(
                f"{GENERIC_CONF}/modules",
                "# every guest's disk and filesystem drivers (vimgtools rekernel)\n" + listing,
                facts.text(f"{GENERIC_CONF}/modules"),
            ),
            RunCommand(
                (mk, "-d", GENERIC_CONF, "-o", out, v), why + " (its scratch in that guest's /var/tmp)"
            ),
        )
        info |= {"generator": "mkinitramfs", "conf": GENERIC_CONF, "MODULES": "list"}
        checks.append(
            Check(
                "config",
                kernel.config is not None,
                f"mkinitramfs needs /boot/config-{v}: put config-{v} in BOOTDIR"
                if kernel.config is None
                else f"/boot/config-{v} from BOOTDIR (mkinitramfs checks its compressor there)",
            )
        )
    elif dracut := facts.has_tool("dracut"):
        drivers = ("--force-drivers", " ".join(modules)) if modules else ()
        steps = (
            RunCommand((dracut, "--force", "--no-hostonly", "--no-hostonly-cmdline", *drivers, out, v), why),
        )
        info |= {"generator": "dracut", "hostonly": "no"}
    checks.append(
        Check(
            "initramfs-tool",
            bool(steps),
            f"{info['generator']} in the view of {first.view.guest}, writing {out} on the shared /boot"
            if steps
            else f"{first.view.guest}: neither mkinitramfs nor dracut to generate the initramfs with: put a "
            "generic one in BOOTDIR",
        )
    )
    info["describe"] = (
        f"generated by {info.get('generator', 'nothing')} in the view of {first.view.guest} ({', '.join(modules) or 'no modules'}"
        f" for {target}), to {out}; checked on the host after it is made"
    )
    return checks, steps, info


def plan_shared(
    states: Sequence[GuestState],
    kernel: Kernel,
    loader: Bootloader,
    *,
    system: str,
    disks: dict[str, str],
    previous: str | None,
    options: Options,
    initrd_files: list[str] | None,
    initrd_texts: dict[str, str] | None,
    maps: Maps = (),
) -> tuple[Plan, list[Plan]]:
    """The checks and steps of a shared-system-disk run, and one plan per guest for its verify (pure).

    Args:
        states: every guest as read in its view (the first one's view runs SYSTEM's steps).
        disks: appliance disk -> image (``/dev/sda`` is SYSTEM).
        options: ``regenerate_initramfs`` true: a generic initramfs is generated in the first
            guest's view (``plan_generic_initramfs``); else the supplied one is taken.
        initrd_files, initrd_texts: the supplied initramfs, listed and unpacked on the host
            (unused when generating).
        maps: ``--map`` (``shared_maps``): in each guest's own files as its view's maps say (the
            views were found with them), in the shared command lines by position.
    """
    first = states[0]
    filesystems = first.inv.filesystems
    checks: list[Check] = []
    # Each guest must take /boot and /usr from SYSTEM, the same filesystems as the others.
    for s in states:
        for mp in ("/boot", "/usr"):
            dev = s.facts.mountpoints.get(mp)
            want = first.facts.mountpoints.get(mp)
            ok = dev is not None and whole_disk(dev) == SYSTEM_DEV and dev == want
            found = f"{dev} on {disks.get(whole_disk(dev), dev)}" if dev else "not in its fstab"
            checks.append(
                Check(
                    f"shared{mp.replace('/', '-')}:{s.view.name}",
                    ok,
                    f"{s.view.guest}: {mp} is {dev} on {system}"
                    if ok
                    else f"{s.view.guest}: {mp} is {found}: every guest must mount {mp} from {system}"
                    + (f" ({want})" if want and whole_disk(want) == SYSTEM_DEV else ""),
                    refuses_as=InvalidInput,
                )
            )
    # Where /lib/modules resolves in each guest, so where its link lives: with usrmerge (/lib -> usr/lib on
    # the guest's root) /lib/modules is the shared /usr's /usr/lib/modules, one link for every such
    # guest; without it the guest has a /lib of its own, and the link is /lib/modules on its ROOT.
    # Either may already be the link (a second run).
    link: dict[str, Any] = {"link": MODULES_LINK, "target": MODULES_HOME, "on": system, "guests": {}}
    for s in states:
        path = s.facts.modules_path
        on = _step_disk(Write(path, ""), s.view, disks)
        shared_usr = s.facts.lib_is_link and path == MODULES_LINK and on == system
        own_root = not s.facts.lib_is_link and path == "/lib/modules" and on == s.view.guest
        ok = s.facts.modules_on_boot or shared_usr or own_root
        link["guests"][s.view.guest] = {
            "lib_modules": path,
            "on": on,
            "usrmerge": s.facts.lib_is_link,
            "link": f"{link_path(s.facts)} on {system if s.facts.lib_is_link else s.view.guest}",
        }
        checks.append(
            Check(
                f"modules-link:{s.view.name}",
                ok,
                f"{s.view.guest}: /lib/modules is "
                + (
                    f"already {MODULES_HOME} (the link is there)"
                    if s.facts.modules_on_boot
                    else f"{path} on {on}: the link {MODULES_LINK} -> {MODULES_HOME} there serves every "
                    "usrmerged guest"
                    if shared_usr
                    else f"{path} on {on}, the guest's own (no usrmerge): the link {path} -> {MODULES_HOME} "
                    "goes there, for this guest"
                    if own_root
                    else f"{path} on {on}: with a shared system disk /lib/modules must be {MODULES_LINK} on "
                    f"the shared /usr (usrmerge), /lib/modules on the guest's own root, or a link to "
                    f"{MODULES_HOME}"
                ),
                refuses_as=InvalidInput,
            )
        )
    if loader.name == "grub2":
        checks.append(
            Check(
                "loader",
                False,
                f"{system}: GRUB 2 on the shared /boot: update-grub writes the root=UUID= of the guest it "
                "runs in, so one grub.cfg cannot boot every guest; use extlinux or GRUB legacy there",
                refuses_as=BootloaderError,
            )
        )
    # The initramfs: generic, with the drivers of every guest's / and /usr; supplied, or generated.
    generate = bool(options.regenerate_initramfs)
    required = list(
        dict.fromkeys(m for s in states for m in guest_drivers(s.facts, kernel, options.target)[0])
    )
    make: tuple[Step, ...] = ()
    if generate:
        gen_checks, make, initramfs_info = plan_generic_initramfs(first, kernel, required, options.target)
        checks.extend(gen_checks)
        for s in states:
            modules, absent = guest_drivers(s.facts, kernel, options.target)
            checks.append(
                Check(
                    f"initramfs-drivers:{s.view.name}",
                    not absent,
                    f"{s.view.guest}: {', '.join(absent)}: no initramfs can carry it"
                    if absent
                    else f"{s.view.guest}: the drivers of / and /usr on {options.target} "
                    + (
                        f"({', '.join(modules)}) go into the generated initramfs"
                        if modules
                        else "are built in"
                    ),
                )
            )
        if kernel.initramfs is not None:
            initramfs_info["not_used"] = f"{kernel.initramfs} (--regenerate-initramfs)"
    else:
        checks.extend(
            check_shared_initramfs(states, kernel, options.target, initrd_files or [], initrd_texts or {})
        )
        initramfs_info = {
            "source": "supplied",
            "from": str(kernel.initramfs),
            "path": f"/boot/initrd.img-{kernel.version}",
            "on": system,
            "modules": required,
            "describe": f"{kernel.initramfs} (supplied, checked on the host), to /boot/initrd.img-{kernel.version} "
            f"on {system}",
        }
    # The command lines on SYSTEM serve every guest: Xen names by position, the Xen console replaced.
    shared_edits: list[Step] = []
    problems: list[str] = []
    shared_files = {
        p: t
        for p, t in first.inv.files.items()
        if CMDLINE_FILES.match(p) and _step_disk(Write(p, ""), first.view, disks) == system
    }
    if options.target == "kvm":
        r = PositionalResolver(first.inv, maps)
        for path, old in sorted(shared_files.items()):
            new = edit_cmdline_file(path, old, r, problems)
            if new != old:
                shared_edits.append(Write(path, new, old))
    edited = {w.path: w.text for w in shared_edits if isinstance(w, Write)}
    roots = cmdline_roots({**shared_files, **edited})
    for s in states:
        checks.append(check_root_specs(roots, s, filesystems, system))
    steps: list[Step] = []
    where: list[str | None] = []
    subplans: list[Plan] = []

    def add(step: Step, disk: str | None) -> None:
        steps.append(step)
        where.append(disk)

    # The module trees of each place a link goes (the shared /usr once, each guest's own /lib): the first
    # place holding a version moves it to /boot/modules; a later one's tree of that version is kept
    # aside on its own disk (KEPT_MODULES), never removed, and the guest's old kernel then loads the
    # first one's (a warning when their sizes differ).
    on_boot = {
        v: (st.view.guest, n)
        for st in states
        if st.facts.modules_on_boot
        for v, n in st.facts.module_versions.items()
    }
    moved: dict[str, tuple[str, int]] = {}
    places: set[tuple[str | None, str]] = set()
    more_moved = 0
    kept: list[dict[str, Any]] = []
    for i, s in enumerate(states):
        facts = dataclasses.replace(s.facts, files={**s.facts.files, **edited})
        own_edits: list[Step] = []
        rt = None
        if options.target == "kvm":
            rt = plan_xen(
                facts,
                s.inv,
                loader.name,
                version=kernel.version,
                kernel=None,
                new_kernel_state=kernel.driver_state,
                initrd_path=None,
                initrd_files=None,
                initrd_texts=None,
                options=RetargetOptions(maps=s.view.maps),
            )
            # Its edits on SYSTEM are the shared command lines, made once above by position.
            own_edits = [e for e in rt.edits if _step_disk(e, s.view, disks) == s.view.guest]
            facts = dataclasses.replace(
                facts, files={**facts.files, **{e.path: e.text for e in own_edits if isinstance(e, Write)}}
            )
            for c in rt.checks:
                if c.name == "boot-code" and i > 0:
                    continue  # the boot code is SYSTEM's, checked once
                checks.append(c if c.name == "boot-code" else _per_guest(c, s.view))
        p = plan_rekernel(
            facts,
            kernel,
            loader,
            disk=s.view.guest,
            previous=previous,
            options=options,
            initrd_files=None if generate else initrd_files,
            make_initramfs=make if generate else None,
        )
        if i == 0:
            mode = p.initramfs  # "supplied" or "regenerate:mkinitramfs"
            has_code = any(c.name == "boot-code" for c in checks)
            # The drivers, the initramfs tool and its needs are the shared disk's checks above.
            checks.extend(
                c
                for c in p.checks
                if not c.name.startswith("driver:")
                and c.name not in ("initramfs-tool", "config")
                and not (c.name == "boot-code" and has_code)
            )
        add(
            MountView(s.view.guest, tuple(sorted(s.view.mountpoints.items(), key=lambda kv: len(kv[0])))),
            None,
        )
        if i == 0:
            for e in shared_edits:
                add(e, system)
        for e in own_edits:
            add(e, s.view.guest)
        place = (_step_disk(Write(s.facts.modules_path, ""), s.view, disks), s.facts.modules_path)
        first_here = place not in places
        places.add(place)
        for step in p.steps:
            d = _step_disk(step, s.view, disks)
            if is_link_step(step, s.facts):
                if not first_here:
                    continue  # this place's trees and link were done in an earlier guest's view
                if isinstance(step, Move):
                    ver = posixpath.basename(step.src)
                    size = s.facts.module_versions.get(ver, 0)
                    there = on_boot.get(ver) or moved.get(ver)
                    if there is not None:
                        aside = f"{KEPT_MODULES}/{ver}"
                        if not any(k["guest"] == s.view.guest for k in kept):
                            add(Mkdir(KEPT_MODULES), place[0])
                        add(Move(step.src, aside), place[0])
                        kept.append({"guest": s.view.guest, "version": ver, "path": aside, "uses": there[0]})
                        same = there[1] == size
                        checks.append(
                            Check(
                                f"modules-kept:{s.view.name}:{ver}",
                                same,
                                f"{s.view.guest}: its {s.facts.modules_path}/{ver} is kept at {aside}; "
                                f"{MODULES_HOME}/{ver} is {there[0]}'s, "
                                + (
                                    f"the same size ({size // MiB} MiB)"
                                    if same
                                    else f"{there[1] // MiB} MiB against its own {size // MiB} MiB: its old "
                                    f"kernel {ver} would load {there[0]}'s modules (--force to go on)"
                                ),
                                "warning",
                                refuses_as=InvalidInput,
                            )
                        )
                        continue
                    moved[ver] = (s.view.guest, size)
                    if i > 0:
                        more_moved += size
                add(step, d)  # in this guest's view, also when it lands on SYSTEM
                continue
            if d == system and i > 0:
                continue  # SYSTEM's part is done once, in the first guest's view
            add(step, d)
        if i == 0 and rt is not None:
            for step in rt.code:
                add(step, _step_disk(step, s.view, disks))
        retarget = (rt.info | {"xen": rt.xen, "required": rt.required}) if rt is not None else {}
        # The initramfs is SYSTEM's, checked on the host once (verify_shared), not in each view.
        subplans.append(
            dataclasses.replace(p, checks=(), steps=(), retarget=retarget, disks={}, initramfs="shared")
        )
    if problems:
        checks.append(Check("cmdline", False, "; ".join(problems), refuses_as=InvalidInput))
    if more_moved:  # other guests' trees go to the shared /boot too
        space = space_check(first.facts, kernel, regenerate=generate, more_moved=more_moved)
        checks = [space if c.name == "space" else c for c in checks]
    link["kept"] = kept
    shared_info = {
        "system": system,
        "guests": [
            {
                "disk": s.view.guest,
                "appliance_disk": s.view.disk,
                "root": s.view.root,
                "mountpoints": s.view.mountpoints,
                "order": f"{s.view.guest} first (xvda/vda), {system} second (xvdb/vdb)",
            }
            for s in states
        ],
        "modules_link": link
        | {
            "resolved_by": "each guest's own namespace at boot: /usr mounted by the initramfs, /boot by "
            f"systemd from the guest's fstab, {BOOT_MODULES_UNIT_NAME} loading what udev missed before"
        },
        "cmdline_roots": [{"file": f, "root": r} for f, r in roots],
        "maps": {
            old: f"{new} (each guest's {'ROOT' if new.endswith('a') else 'system disk'})" for old, new in maps
        },
        "initramfs": initramfs_info,
        "loader_files": sorted(shared_files),
    }
    plan = Plan(
        disk=system,
        root=first.facts.root,
        version=kernel.version,
        previous=previous,
        loader=loader.name,
        initramfs=mode,
        checks=tuple(checks),
        steps=tuple(steps),
        facts=first.facts.summary(),
        action="rekernel-shared",
        initramfs_modules=tuple(dict.fromkeys(required)),
        retarget={
            "xen": any(sp.retarget.get("xen") for sp in subplans),
            "markers": [
                f"{s.view.name}: {len(sp.retarget.get('markers', []))} Xen settings"
                for s, sp in zip(states, subplans, strict=True)
            ],
        },
        disks=disks,
        step_disks=tuple(where),
        shared=shared_info,
    )
    return plan, subplans


KEPT_MODULES = "/lib/vimgtools-modules-kept"  # a guest's own module trees /boot/modules has from another


def link_path(facts: GuestFacts) -> str:
    """Where a guest's modules link lives: the shared ``/usr/lib/modules`` with usrmerge, else its own
    ``/lib/modules``."""
    return MODULES_LINK if facts.lib_is_link else "/lib/modules"


def is_link_step(step: Step, facts: GuestFacts) -> bool:
    """A step of the modules convention on the guest's ``/lib/modules`` (``plan_rekernel``'s): a tree
    moved out, the directory removed, the link made, the new version's old tree removed."""
    here = facts.modules_path
    match step:
        case Move(src, _dst):
            return src.startswith(here + "/")
        case RemoveDir(path):
            return path == here
        case Symlink(target, path):
            return target == MODULES_HOME and path == here
        case RunCommand(argv):
            return argv[:2] == ("rm", "-rf") and len(argv) == 3 and argv[2].startswith(here + "/")
    return False


def read_guests(gi: Guest, guests: Sequence[Path], maps: Maps = ()) -> list[GuestState]:
    """Every guest's view, facts and inventory (each view mounted in turn; the first is left mounted);
    ``maps``: ``--map`` (``shared_maps``)."""
    roots = gi.roots()
    filesystems = read_filesystems(gi)
    states = []
    for i, g in enumerate(guests):
        disk = f"/dev/sd{chr(ord('b') + i)}"
        view = find_view(gi, roots, str(g), disk, filesystems, maps)
        gi.mount_view(view.mountpoints)
        facts = collect_facts(
            gi, view.root, mountpoints=view.mountpoints, extra_files=(STATE_FILE, *GENERIC_CONF_FILES)
        )
        inv = collect_inventory(gi, [])
        states.append(GuestState(view, facts, inv))
    gi.mount_view(states[0].view.mountpoints)
    return states


def verify_initramfs(
    gi: Guest, states: Sequence[GuestState], kernel: Kernel, target: str, plan: Plan
) -> dict[str, Any]:
    """The initramfs on SYSTEM, downloaded and checked on the host as a supplied one is before the run
    (``check_shared_initramfs``): a generated one is checked here for the first time.

    Raises:
        GuestError: it is missing, or a check fails; the message lists them.
    """
    path = plan.shared["initramfs"]["path"]
    if not gi.is_file(path):
        raise GuestError(f"verify: {path} is missing on {plan.disk}")
    with tempfile.TemporaryDirectory(prefix="vimg-initrd-") as tmp:
        local = Path(tmp) / "initrd"
        gi.download(path, str(local))
        files, texts = list_initramfs(local), initramfs_texts(local)
    bad = [c for c in check_shared_initramfs(states, kernel, target, files, texts) if not c.ok]
    if bad:
        what = plan.shared["initramfs"]["source"]
        raise GuestError(
            f"verify: the {what} initramfs {path}: " + "; ".join(f"{c.name}: {c.message}" for c in bad)
        )
    return {
        "path": path,
        "source": plan.shared["initramfs"]["source"],
        "files": len(files),
        "drivers": list(plan.initramfs_modules),
        "checked": "generic, for the kernel, every guest's drivers, no /dev/xvd baked in",
    }


def verify_shared(
    gi: Guest,
    states: Sequence[GuestState],
    loader: Bootloader,
    plan: Plan,
    subplans: Sequence[Plan],
    *,
    kernel: Kernel,
    target: str,
) -> dict[str, Any]:
    """Re-read each guest's view: the new kernel, its modules through the link, the loader, its own
    files; and the initramfs on SYSTEM, on the host (``verify_initramfs``).

    Raises:
        GuestError: something a guest needs is missing or points elsewhere; the message names the guest.
    """
    out: dict[str, Any] = {}
    v = plan.version
    for s, sub in zip(states, subplans, strict=True):
        gi.mount_view(s.view.mountpoints)
        try:
            got = verify(gi, s.facts, loader, sub)
            got.update(verify_retarget(gi, sub))
        except GuestError as e:
            raise GuestError(f"{s.view.guest}: {e}") from e
        real = gi.realpath(f"/lib/modules/{v}")
        if real != f"{MODULES_HOME}/{v}":
            raise GuestError(f"{s.view.guest}: verify: /lib/modules/{v} resolves to {real}")
        where = link_path(s.facts)
        link = gi.readlink(where)
        if link != MODULES_HOME:
            raise GuestError(f"{s.view.guest}: verify: {where} is {link!r}, not a link to {MODULES_HOME}")
        for k in plan.shared.get("modules_link", {}).get("kept", []):
            if k["guest"] == s.view.guest and not gi.is_dir(k["path"]):
                raise GuestError(f"{s.view.guest}: verify: its module tree kept at {k['path']} is missing")
        if s.facts.boot_separate and not (gi.is_file(UNIT) and gi.is_symlink(UNIT_WANTS)):
            raise GuestError(f"{s.view.guest}: verify: {UNIT} is not installed and enabled")
        files = {p: t for p in plan.shared.get("loader_files", []) if (t := gi.text(p)) is not None}
        check = check_root_specs(cmdline_roots(files), s, s.inv.filesystems, plan.disk)
        if not check.ok:
            raise GuestError(f"verify: {check.message}")
        got["modules_link"] = f"{where} -> {link}; /lib/modules/{v} -> {real}"
        got["root"] = check.message
        out[s.view.guest] = got
    return {"guests": out, "initramfs": verify_initramfs(gi, states, kernel, target, plan)}


def _shared_disks(system: str | os.PathLike[str], guests: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """SYSTEM, then each guest's ROOT (at least one), each disk once."""
    roots = [Path(g) for g in guests]
    if not roots:
        raise InvalidInput("a shared system disk needs at least one --guest ROOT")
    return as_disks([system, *roots])


def rekernel_shared(
    system: str | os.PathLike[str],
    from_dir: str | os.PathLike[str],
    guests: Iterable[str | os.PathLike[str]],
    *,
    version: str | None = None,
    target: str = "kvm",
    force: bool = False,
    dry_run: bool = False,
    regenerate_initramfs: bool | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    maps: Iterable[str] = (),
) -> Result:
    """Put the kernel from ``from_dir`` on the shared ``system`` disk for every guest; all or nothing.

    Args:
        system: the shared system disk (raw): every guest's ``/boot`` and ``/usr``.
        from_dir: BOOTDIR with the kernel, its modules and optionally a generic initramfs.
        guests: each guest's root disk (raw); each guest sees it first and ``system`` second.
        target: "kvm" (guests moved off Xen are retargeted, each on its own disk) or "xen".
        regenerate_initramfs: as ``rekernel()``: True generates a generic initramfs in the first
            guest's view even when ``from_dir`` has one (then not used), False never generates one
            (``from_dir`` must have it); default: generate only when ``from_dir`` has none.
        maps: ``OLD=NEW`` device prefixes of the guests' (``/dev/hda=/dev/sda``) rewritten besides
            ``/dev/xvd*``; NEW is one of the two disks each guest sees, ``/dev/sda`` its own ROOT,
            ``/dev/sdb`` the system disk (``shared_maps``).
        Others as ``rekernel()``.

    Raises:
        InvalidInput: no guest, a disk given twice, a ``maps`` NEW that is neither disk, no initramfs in BOOTDIR with
            ``regenerate_initramfs=False``, a guest that does not take /boot and /usr from
            ``system``, a root= that does not name every guest's root (exit 2).
        KernelError, BootloaderError, ImageRefused: refused before any change (exit 2), e.g. an image
            a running QEMU holds.
        GuestError, ImageError: failed; every disk is as it was. ``error.result`` as ``rekernel()``.
    """
    if target not in ("kvm", "xen"):
        raise InvalidInput(f"--target {target}: use kvm or xen")
    t_start = time.monotonic()
    pairs = shared_maps(maps)
    disks = _shared_disks(system, guests)
    kernel = find_kernel(Path(from_dir), version=version)
    if kernel.initramfs is None and regenerate_initramfs is False:
        raise InvalidInput(
            f"{from_dir}: no initramfs, and --no-regenerate-initramfs: put a generic one in BOOTDIR "
            "(initrd.img-VER made with MODULES=most or a list carrying every guest's disk and filesystem "
            "drivers), or let one be generated in the first guest's view"
        )
    generate = regenerate_initramfs if regenerate_initramfs is not None else kernel.initramfs is None
    initrd_files: list[str] | None = None
    initrd_texts: dict[str, str] | None = None
    if not generate:
        assert kernel.initramfs is not None
        initrd_files, initrd_texts = list_initramfs(kernel.initramfs), initramfs_texts(kernel.initramfs)
    options = Options(target=target, force=force, regenerate_initramfs=generate)
    dmap = disk_map(disks)
    result = Result(plan=None, dry_run=dry_run, action="rekernel-shared")
    with disks_session(disks, result, workdir=Path(workdir) if workdir else None) as gi:
        t0 = time.monotonic()
        states = read_guests(gi, disks[1:], pairs)
        loader = detect(states[0].facts)
        try:
            previous = version_of(loader.default_entry(gi, states[0].facts).kernel)
        except (BootloaderError, GuestError) as e:
            log.warning("cannot tell which kernel the guests boot now: %s", e)
            previous = None
        result.seconds["inspect"] = round(time.monotonic() - t0, 2)
        result.plan, subplans = plan_shared(
            states,
            kernel,
            loader,
            system=str(disks[0]),
            disks=dmap,
            previous=previous,
            options=options,
            initrd_files=initrd_files,
            initrd_texts=initrd_texts,
            maps=pairs,
        )
        log.info("%s", result.plan.describe(diffs=dry_run))
        refusal = result.plan.refusal(force=force)
        if refusal is not None:
            raise refusal
        t1 = time.monotonic()
        apply_plan(gi, states[0].facts, loader, result.plan, progress, done=result.done)
        result.seconds["apply"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        result.verified = verify_shared(
            gi, states, loader, result.plan, subplans, kernel=kernel, target=target
        )
        result.seconds["verify"] = round(time.monotonic() - t2, 2)
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    result.seconds["work"] = round(result.seconds["total"] - result.seconds.get("launch", 0.0), 2)
    return result


def rollback_shared(
    system: str | os.PathLike[str],
    guests: Iterable[str | os.PathLike[str]],
    *,
    dry_run: bool = False,
    workdir: str | os.PathLike[str] | None = None,
    maps: Iterable[str] = (),
) -> Result:
    """Make the kernel the guests of the shared ``system`` disk booted before the last shared rekernel
    their default again (``rekernel --rollback SYSTEM --guest ROOT ...``).

    As ``rollback()`` on one disk, from the state file on SYSTEM (``plan.plan_rollback``): the loader's
    default and the state file change, both on SYSTEM; the kernels, their modules, the links and each
    guest's own files stay. Every disk is locked and refused when a running QEMU holds it (no guest
    may run while its ``/boot`` changes), one appliance, the plan made in the first guest's view and
    verified in every guest's (its default entry boots the previous kernel with a ``root=`` naming
    its root), committed all or none like the rekernel (only SYSTEM has changes).

    Raises:
        InvalidInput: no guest, a disk given twice, bad ``maps``; SYSTEM has no state file or its
            previous kernel is gone (exit 2, nothing changed).
        GuestError, ImageError: failed; every disk is as it was. ``error.result`` as ``rekernel()``.
    """
    t_start = time.monotonic()
    pairs = shared_maps(maps)
    disks = _shared_disks(system, guests)
    dmap = disk_map(disks)
    result = Result(plan=None, dry_run=dry_run, action="rollback-shared")
    with disks_session(disks, result, workdir=Path(workdir) if workdir else None) as gi:
        t0 = time.monotonic()
        states = read_guests(gi, disks[1:], pairs)
        loader = detect(states[0].facts)
        result.seconds["inspect"] = round(time.monotonic() - t0, 2)
        plan = plan_rollback(states[0].facts, loader, disk=str(disks[0]))
        first = states[0]
        loader_files = sorted(
            p
            for p in first.inv.files
            if CMDLINE_FILES.match(p) and _step_disk(Write(p, ""), first.view, dmap) == str(disks[0])
        )
        roots_in = cmdline_roots({p: first.inv.files[p] for p in loader_files})
        checks = [check_root_specs(roots_in, st, st.inv.filesystems, str(disks[0])) for st in states]
        result.plan = dataclasses.replace(
            plan,
            checks=plan.checks + tuple(checks),
            action="rollback-shared",
            disks=dmap,
            step_disks=tuple(str(disks[0]) for _ in plan.steps),  # the loader's file and the state file
            shared={
                "system": str(disks[0]),
                "guests": [{"disk": s.view.guest, "root": s.view.root} for s in states],
                "maps": {old: new for old, new in pairs},
                "loader_files": loader_files,
            },
        )
        log.info("%s", result.plan.describe(diffs=dry_run))
        refusal = result.plan.refusal()
        if refusal is not None:
            raise refusal
        t1 = time.monotonic()
        apply_plan(gi, states[0].facts, loader, result.plan, done=result.done)
        result.seconds["apply"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        verified: dict[str, Any] = {}
        for s in states:
            gi.mount_view(s.view.mountpoints)
            try:
                got = verify_rollback(gi, s.facts, loader, result.plan)
            except GuestError as e:
                raise GuestError(f"{s.view.guest}: {e}") from e
            files = {p: t for p in loader_files if (t := gi.text(p)) is not None}
            check = check_root_specs(cmdline_roots(files), s, s.inv.filesystems, str(disks[0]))
            if not check.ok:
                raise GuestError(f"verify: {check.message}")
            got["root"] = check.message
            verified[s.view.guest] = got
        result.verified = {"guests": verified}
        result.seconds["verify"] = round(time.monotonic() - t2, 2)
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    return result
