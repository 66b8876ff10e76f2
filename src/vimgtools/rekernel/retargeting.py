"""``retarget()``: make a guest moved off Xen boot on KVM, keeping its kernel; and the re-reading verify.

The same session as ``rekernel()`` (lock, overlay, one appliance, commit through the journal): the
inventory (``guest.inventory``), the plan (``rekernel.xen``, pure), the one runner
(``rekernel.apply``), then ``verify_retarget`` re-reads the disk: no ``xvd``, ``hvc0`` or ``xvc0`` left
in any command line, fstab, crypttab or getty configuration, every fstab entry resolves to one
filesystem, the booting kernel's initramfs carries the drivers (listed on the host), the boot code
is there when it was written. ``rekernel()`` calls ``retarget_for_swap``, ``xen.merge_plan`` and
``verify_retarget`` so that a kernel swap with ``--target kvm`` retargets in the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vimgtools.boot import Bootloader
from vimgtools.errors import BootloaderError, GuestError, InvalidInput
from vimgtools.guest.facts import GuestFacts, boot_code_of
from vimgtools.guest.inventory import GETTY_DIRS, Inventory, collect_inventory, read_filesystems
from vimgtools.guest.protocol import Guest
from vimgtools.guest.steps import RunCommand, Step, Write
from vimgtools.kernel import Kernel, initramfs_has, initramfs_texts, list_initramfs
from vimgtools.rekernel.apply import apply_plan, find_initramfs
from vimgtools.rekernel.plan import Plan, version_of
from vimgtools.rekernel.session import Result, guest_session
from vimgtools.rekernel.xen import (
    CMDLINE_FILES,
    XEN_WORDS,
    Resolver,
    Retarget,
    RetargetOptions,
    check_initramfs,
    parse_maps,
    plan_retarget,
    plan_xen,
)

log = logging.getLogger("vimgtools.rekernel")

XEN_REFUSED = (
    "--target xen: retargeting a guest to Xen is not supported (only from Xen to KVM); a kernel swap "
    "with --from and --target xen checks the xen-blkfront driver and changes nothing else"
)


def loader_regenerate(loader: Bootloader, facts: GuestFacts) -> list[Step]:
    """Steps that remake the loader's generated configuration from the edited sources (GRUB 2 only)."""
    if loader.name != "grub2":
        return []  # extlinux.conf, menu.lst and BLS entries are edited directly
    cfg = next((p for p in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg") if p in facts.files), None)
    tool = facts.has_tool("update-grub")
    if tool and cfg == "/boot/grub/grub.cfg":
        return [RunCommand((tool,), "regenerate grub.cfg from the edited /etc/default/grub")]
    mk = facts.has_tool("grub-mkconfig", "grub2-mkconfig")
    return [RunCommand((mk, "-o", cfg or "/boot/grub/grub.cfg"), "regenerate grub.cfg")] if mk else []


def _host_initramfs(gi: Guest, path: str) -> tuple[list[str], dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="vimg-initrd-") as tmp:
        local = Path(tmp) / "initrd"
        gi.download(path, str(local))
        return list_initramfs(local), initramfs_texts(local)


DiskArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def as_disks(disk: DiskArg) -> list[Path]:
    """One DISK or several (in the order the guest sees them) as paths; each must exist."""
    disks = [Path(disk)] if isinstance(disk, (str, os.PathLike)) else [Path(d) for d in disk]
    if not disks:
        raise InvalidInput("DISK is required")
    for d in disks:
        if not d.exists():
            raise InvalidInput(f"{d}: no such file or device")
    if len({d.resolve() for d in disks}) != len(disks):
        raise InvalidInput("a DISK is given twice")
    return disks


def disk_map(disks: list[Path]) -> dict[str, str]:
    """How the appliance names each DISK: /dev/sda the first, /dev/sdb the second, ..."""
    return {f"/dev/sd{chr(ord('a') + i)}": str(d) for i, d in enumerate(disks)} if len(disks) > 1 else {}


def retarget(
    disk: DiskArg,
    *,
    initramfs: str | os.PathLike[str] | None = None,
    maps: Iterable[str] = (),
    target: str = "kvm",
    fmt: str | None = None,
    root: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    regenerate_initramfs: bool | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Result:
    """Make the guest on ``disk``, moved off Xen, boot on KVM with its own kernel; all or nothing.

    Args:
        disk: the guest's disk, or its disks in the order the guest sees them (one appliance, an
            overlay each, committed all or none).
        initramfs: an initramfs for the guest's default kernel, made elsewhere, to install instead of
            regenerating one in the guest (checked on the host first: version, drivers, no xvd).
        maps: ``OLD=NEW`` device prefixes to rewrite besides ``/dev/xvd*`` (``/dev/hda=/dev/sda``).
        regenerate_initramfs: False: neither regenerate nor install; the guest's own initramfs is
            checked and must already carry the drivers.
        Others as ``rekernel()``.

    Raises:
        InvalidInput: ``target`` is not "kvm", bad ``maps``, a root or fstab entry that cannot be
            mapped (exit 2, nothing changed).
        KernelError: a PV-only kernel, no virtio driver, an initramfs that lacks them (exit 2).
        BootloaderError: no boot code and no way to write it, a partitionless disk (exit 2).
        GuestError, ImageError: failed; ``disk`` is as it was. ``error.result`` as ``rekernel()``.
    """
    if target != "kvm":
        raise InvalidInput(XEN_REFUSED)
    pairs = parse_maps(maps)
    t_start = time.monotonic()
    disks = as_disks(disk)
    supplied = Path(initramfs) if initramfs else None
    files = texts = None
    if supplied is not None:
        if not supplied.is_file():
            raise InvalidInput(f"--initramfs {supplied}: no such file")
        files, texts = list_initramfs(supplied), initramfs_texts(supplied)
    result = Result(plan=None, dry_run=dry_run, action="retarget")
    target_disks: Path | list[Path] = disks[0] if len(disks) == 1 else disks
    with guest_session(
        target_disks, result, fmt=fmt, root=root, workdir=Path(workdir) if workdir else None
    ) as s:
        t0 = time.monotonic()
        entry = s.loader.default_entry(s.guest, s.facts)
        version = version_of(entry.kernel)
        if version is None:
            raise BootloaderError(
                f"{disks[0]}: the default entry boots {entry.kernel}: cannot tell its version"
            )
        inv = collect_inventory(s.guest, s.facts.boot_kernels)
        initrd = entry.initrd or find_initramfs(s.guest, version)
        regenerate = supplied is None and regenerate_initramfs is not False
        if not regenerate and supplied is None and initrd is not None:
            files, texts = _host_initramfs(s.guest, initrd)  # the guest's own, checked as it is
        result.seconds["inventory"] = round(time.monotonic() - t0, 2)
        options = RetargetOptions(
            maps=pairs, regenerate=regenerate, supplied=str(supplied) if supplied else None
        )
        result.plan = plan_retarget(
            s.facts,
            inv,
            s.loader.name,
            loader_regenerate(s.loader, s.facts),
            disk=" ".join(map(str, disks)),
            version=version,
            initrd_path=initrd,
            initrd_files=files,
            initrd_texts=texts,
            options=options,
        )
        result.plan = dataclasses.replace(result.plan, disks=disk_map(disks))
        log.info("%s", result.plan.describe(diffs=dry_run))
        refusal = result.plan.refusal(force=force)
        if refusal is not None:
            raise refusal
        t1 = time.monotonic()
        apply_plan(s.guest, s.facts, s.loader, result.plan, progress, done=result.done)
        result.seconds["apply"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        result.verified = verify_retarget(s.guest, result.plan)
        result.seconds["verify"] = round(time.monotonic() - t2, 2)
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    result.seconds["work"] = round(result.seconds["total"] - result.seconds.get("launch", 0.0), 2)
    return result


def retarget_for_swap(
    gi: Guest,
    facts: GuestFacts,
    loader: str,
    kernel: Kernel,
    *,
    maps: Iterable[str] = (),
    initrd_files: list[str] | None = None,
) -> tuple[Retarget, GuestFacts]:
    """The Xen -> KVM retarget for a kernel swap (``--from`` + kvm), and the facts as it leaves them.

    The swap is then planned on the returned facts (its loader steps see the edited
    ``/etc/default/grub``) and ``merge_plan`` puts the edits first (a regenerated initramfs then
    carries the virtio drivers and the NIC's .link) and the boot code last. The new kernel's
    initramfs is the swap's: supplied in BOOTDIR (its baked-in configuration and NIC naming are
    checked here too) or regenerated.
    """
    inv = collect_inventory(gi, [])  # the guest's own kernels do not boot: no need to read their trees
    rt = plan_xen(
        facts,
        inv,
        loader,
        version=kernel.version,
        kernel=None,
        new_kernel_state=kernel.driver_state,
        initrd_path=None,
        initrd_files=None,
        initrd_texts=None,
        options=RetargetOptions(maps=parse_maps(maps)),
    )
    if rt.xen and kernel.initramfs is not None and initrd_files is not None:
        extra = check_initramfs(
            initrd_files, initramfs_texts(kernel.initramfs), kernel.version, [], rt.info.get("nic_link")
        )
        rt.checks.extend(c for c in extra if c.name in ("initramfs-config", "initramfs-nic"))
    edited = {w.path: w.text for w in rt.edits if isinstance(w, Write)}
    return rt, dataclasses.replace(facts, files={**facts.files, **edited})


def _lines_to_check(path: str, text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if path in ("/etc/default/grub", "/etc/sysconfig/grub"):
        return [ln for ln in lines if ln.lstrip().startswith("GRUB_CMDLINE_LINUX")]
    if path.endswith("grub.cfg"):
        return [ln for ln in lines if re.match(r"\s*linux(16|efi)?\s", ln)]
    return lines


def verify_retarget(gi: Guest, plan: Plan) -> dict[str, Any]:
    """Re-read the disk and check that the retarget is all there (see the module docstring).

    Raises:
        GuestError: a Xen name is left, an fstab entry resolves to nothing, the initramfs lacks a
            driver, the boot code is missing; the message says where.
    """
    rt = plan.retarget
    if not rt.get("xen"):
        return {"retarget": "nothing to retarget"}
    gi.remount()
    left: list[str] = []
    paths = {p for p in rt.get("inventory", {}).get("files", []) if CMDLINE_FILES.match(p)}
    paths |= {"/etc/fstab", "/etc/crypttab", "/etc/inittab", "/etc/securetty", "/boot/grub/grub.cfg"}
    if gi.is_dir("/boot/loader/entries"):
        paths |= {f"/boot/loader/entries/{n}" for n in gi.ls("/boot/loader/entries") if n.endswith(".conf")}
    for path in sorted(paths):
        text = gi.text(path)
        if text is None:
            continue
        bad = [ln.strip() for ln in _lines_to_check(path, text) if XEN_WORDS.search(ln)]
        left.extend(f"{path}: {ln}" for ln in bad)
    for d in GETTY_DIRS:
        if gi.is_dir(d):
            left.extend(f"{d}/{n}" for n in gi.ls(d) if "@hvc0" in n or "@xvc0" in n)
    if left:
        raise GuestError("verify: Xen names left: " + "; ".join(left))
    out: dict[str, Any] = {"xen_names_left": 0}
    fs = read_filesystems(gi)
    r = Resolver(Inventory([], [], fs, {}, {}, {}, {}))
    unresolved = []
    fstab = gi.text("/etc/fstab") or ""
    for line in fstab.splitlines():
        w = line.split()
        if (
            not w
            or w[0].startswith("#")
            or len(w) < 3
            or (w[2] == "swap" and not w[0].startswith(("UUID=", "LABEL=")))
        ):
            continue
        if w[0].startswith(("UUID=", "LABEL=", "/dev/")) and not r.resolves(w[0]):
            unresolved.append(f"{w[0]} ({w[1]})")
    if unresolved:
        raise GuestError("verify: fstab entries that name no filesystem: " + ", ".join(unresolved))
    out["fstab"] = "every entry resolves"
    initrd = rt.get("initrd") or find_initramfs(gi, plan.version)
    required = list(rt.get("required", []))
    if initrd and required and plan.action == "retarget":
        files, texts = _host_initramfs(gi, initrd)
        missing = [m for m in required if not initramfs_has(files, m)]
        if missing:
            raise GuestError(f"verify: {initrd} lacks {', '.join(missing)}")
        baked = [p for p, t in texts.items() if "/dev/xvd" in t]
        if baked:
            raise GuestError(f"verify: {initrd} names /dev/xvd in {', '.join(baked)}")
        out["initramfs"] = {"path": initrd, "files": len(files), "drivers": required}
    if rt.get("write_boot_code"):
        disk = rt.get("boot_disk", "/dev/sda")
        code = boot_code_of(gi.pread_device(disk, 512, 0))
        if code is None:
            raise GuestError(f"verify: still no boot code in {disk}'s MBR")
        out["boot_code"] = code
    link = rt.get("nic_link")
    if link:
        if not gi.is_file(link):
            raise GuestError(f"verify: {link} is missing")
        out["nic_link"] = link
    return out
