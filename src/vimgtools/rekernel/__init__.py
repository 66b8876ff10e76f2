"""rekernel: swap a guest's kernel offline, in one libguestfs launch, all-or-nothing.

inspect -> preflight -> plan -> apply (on a qcow2 overlay) -> verify (re-read) -> commit (journal).
``rekernel(disk, from_dir)`` and ``rollback(disk)`` are the library entries, both run in one
``session.guest_session`` and both as a plan (``plan.plan_rekernel``, ``plan.plan_rollback``) that
``apply.apply_plan`` runs; ``python -m vimgtools.rekernel`` is the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from vimgtools import drill
from vimgtools.errors import BootCheckFailed, BootloaderError, GuestError, InvalidInput, VimgError
from vimgtools.kernel import Kernel, find_kernel, list_initramfs
from vimgtools.rekernel.apply import apply_plan, verify, verify_rollback
from vimgtools.rekernel.plan import STATE_FILE, Options, Plan, plan_rekernel, plan_rollback, version_of
from vimgtools.rekernel.retargeting import (
    DiskArg,
    as_disks,
    disk_map,
    retarget,
    retarget_for_swap,
    verify_retarget,
)
from vimgtools.rekernel.session import Result, guest_session
from vimgtools.rekernel.xen import merge_plan

log = logging.getLogger("vimgtools.rekernel")


def _refuse_or_go_on(plan: Plan, *, force: bool, dry_run: bool) -> None:
    log.info("%s", plan.describe(diffs=dry_run))
    refusal = plan.refusal(force=force)
    if refusal is not None:
        raise refusal


def rekernel(
    disk: DiskArg,
    from_dir: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    root: str | None = None,
    version: str | None = None,
    target: str = "kvm",
    force: bool = False,
    dry_run: bool = False,
    regenerate_initramfs: bool | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    boot_check: bool | Mapping[str, Any] = False,
    maps: Iterable[str] = (),
) -> Result:
    """Swap in the kernel from ``from_dir`` and make it the guest's default; all or nothing.

    Args:
        disk: the guest's disk image (raw is committed crash-atomically; qcow2 via qemu-img commit),
            or its disks in the order the guest sees them (one appliance, all raw, committed all or
            none: ``rekernel.group``).
        from_dir: BOOTDIR with ``vmlinuz-VER``, ``modules/VER/`` and optionally config, System.map,
            initramfs.
        fmt: the disk's format (default: probed with qemu-img).
        root: the guest root device when there are several systems.
        version: the kernel to take when ``from_dir`` has several.
        target: hypervisor the guest will run on: "kvm" (virtio; a guest moved off Xen is retargeted
            in the same run, ``rekernel.retargeting``) or "xen" (xen-blkfront checked, nothing retargeted).
        force: go on despite warnings (never errors).
        dry_run: rehearse everything on the overlay and throw it away.
        regenerate_initramfs: force (True) or forbid (False) making the initramfs in the guest;
            default: only when ``from_dir`` has none.
        workdir: where the temporary overlay goes (default: beside ``disk``).
        progress: called before each step with (index from 1, number of steps, description).
        boot_check: before committing, boot the work overlay with the drill (``vimgtools.drill.boot``;
            a mapping gives the drill's options, e.g. ``{"expect": "login:", "timeout": 300}``) and
            commit only when the new kernel's version is seen running; else BootCheckFailed, with
            the drill's report, and DISK as it was.
        maps: ``--target kvm``: ``OLD=NEW`` device prefixes rewritten besides ``/dev/xvd*``.

    Raises:
        KernelError, BootloaderError, ImageRefused, InvalidInput: refused before any change (exit 2).
        GuestError, ImageError: failed; ``disk`` is as it was.
        BootCheckFailed: the boot check did not see the new kernel running (exit 1); ``disk`` as it was.
        Once the disk is opened, the exception's ``result`` is what was decided and done (for --json).
    """
    if target not in ("kvm", "xen"):
        raise InvalidInput(f"--target {target}: use kvm or xen")
    t_start = time.monotonic()
    disks = as_disks(disk)
    kernel: Kernel = find_kernel(Path(from_dir), version=version)
    log.info("kernel %s (%s) from %s", kernel.version, kernel.arch, kernel.image)
    options = Options(target=target, force=force, regenerate_initramfs=regenerate_initramfs)
    regenerate = regenerate_initramfs if regenerate_initramfs is not None else kernel.initramfs is None
    initrd_files = list_initramfs(kernel.initramfs) if kernel.initramfs and not regenerate else None
    result = Result(plan=None, dry_run=dry_run)
    check = None
    if boot_check:
        drill_options = dict(boot_check) if isinstance(boot_check, Mapping) else {}
        check = functools.partial(_boot_check, version=kernel.version, result=result, options=drill_options)
    if check is not None and len(disks) > 1:
        raise InvalidInput("--boot-check takes one DISK")
    with guest_session(
        disks[0] if len(disks) == 1 else disks,
        result,
        fmt=fmt,
        root=root,
        workdir=Path(workdir) if workdir else None,
        extra_files=(STATE_FILE,),
        before_commit=check,
    ) as s:
        try:
            previous = version_of(s.loader.default_entry(s.guest, s.facts).kernel)
        except (BootloaderError, GuestError) as e:
            log.warning("cannot tell which kernel the guest boots now: %s", e)
            previous = None
        swap_facts, rt = s.facts, None
        if target == "kvm":  # a guest moved off Xen is retargeted in the same run
            rt, swap_facts = retarget_for_swap(
                s.guest, s.facts, s.loader.name, kernel, maps=maps, initrd_files=initrd_files
            )
        result.plan = plan_rekernel(
            swap_facts,
            kernel,
            s.loader,
            disk=" ".join(map(str, disks)),
            previous=previous,
            options=options,
            initrd_files=initrd_files,
        )
        if rt is not None:
            result.plan = merge_plan(result.plan, rt)
        if len(disks) > 1:
            result.plan = dataclasses.replace(result.plan, disks=disk_map(disks))
        _refuse_or_go_on(result.plan, force=options.force, dry_run=dry_run)
        t1 = time.monotonic()
        apply_plan(s.guest, s.facts, s.loader, result.plan, progress, done=result.done)
        result.seconds["apply"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        result.verified = verify(s.guest, s.facts, s.loader, result.plan)
        if target == "kvm":
            result.verified.update(verify_retarget(s.guest, result.plan))
        result.seconds["verify"] = round(time.monotonic() - t2, 2)
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    result.seconds["work"] = round(result.seconds["total"] - result.seconds.get("launch", 0.0), 2)
    return result


def _boot_check(overlay: Path, *, version: str, result: Result, options: dict[str, Any]) -> None:
    """Boot the changed guest (the work overlay, under a throw-away overlay of the drill's own)."""
    log.info("boot check: booting the changed guest to see %s running", version)
    report = drill.boot([overlay], formats=("qcow2",), **options)
    result.boot_check = report.to_dict()
    log.info("boot check:\n%s", drill.render(report))
    if not report.booted:
        raise BootCheckFailed(
            f"boot check: the changed guest did not boot ({report.reason}; last stage reached: "
            f"{report.stages[-1].name if report.stages else 'none'}); DISK was not written",
            report,
        )
    if report.kernel != version:
        raise BootCheckFailed(
            f"boot check: the guest booted {report.kernel or 'a kernel whose version was not seen'}, "
            f"not {version}; DISK was not written",
            report,
        )


def rollback(
    disk: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    root: str | None = None,
    dry_run: bool = False,
    workdir: str | os.PathLike[str] | None = None,
) -> Result:
    """Make the kernel the guest booted before the last rekernel the default again (same commit path).

    Raises:
        InvalidInput: the guest was not rekernelled by vimgtools (no state file) or its previous kernel
            is gone (the rollback plan's checks; exit 2, nothing changed).
        GuestError, ImageError: failed; ``disk`` is as it was. As with ``rekernel``, ``error.result``.
    """
    t_start = time.monotonic()
    disk = Path(disk)
    result = Result(plan=None, dry_run=dry_run, action="rollback")
    with guest_session(
        disk,
        result,
        fmt=fmt,
        root=root,
        workdir=Path(workdir) if workdir else None,
        extra_files=(STATE_FILE,),
    ) as s:
        result.plan = plan_rollback(s.facts, s.loader, disk=str(disk))
        _refuse_or_go_on(result.plan, force=False, dry_run=dry_run)
        t1 = time.monotonic()
        apply_plan(s.guest, s.facts, s.loader, result.plan, done=result.done)
        result.seconds["apply"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        result.verified = verify_rollback(s.guest, s.facts, s.loader, result.plan)
        result.seconds["verify"] = round(time.monotonic() - t2, 2)
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    return result


class _CallableModule(types.ModuleType):
    """Lets ``vimgtools.rekernel(disk, from_dir)`` work although ``vimgtools.rekernel`` is this package."""

    def __call__(self, *args: Any, **kw: Any) -> Result:
        return rekernel(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Result", "VimgError", "rekernel", "retarget", "rollback"]
