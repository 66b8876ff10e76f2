"""rekernel: swap a guest's kernel offline, in one libguestfs launch, all-or-nothing.

inspect -> preflight -> plan -> apply (on a qcow2 overlay) -> verify (re-read) -> commit (journal).
``rekernel(disk, from_dir)`` is the library entry; ``python -m vimgtools.rekernel`` the CLI.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimgtools.errors import BootloaderError, GuestError, ImageRefused, InvalidInput, KernelError, VimgError
from vimgtools.kernel import Kernel, find_kernel
from vimgtools.rekernel.plan import STATE_FILE, Check, Options, Plan, plan_rekernel

log = logging.getLogger("vimgtools.rekernel")


@dataclass
class Result:
    """What a run decided and did; ``to_dict()`` is the CLI's ``--json`` object."""

    plan: Plan | None
    dry_run: bool
    committed: bool = False
    bytes_committed: int = 0
    done: list[dict[str, Any]] = field(default_factory=list)
    verified: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    action: str = "rekernel"

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "plan": self.plan.to_dict() if self.plan else None,
            "dry_run": self.dry_run,
            "committed": self.committed,
            "bytes_committed": self.bytes_committed,
            "done": self.done,
            "verified": self.verified,
            "seconds": self.seconds,
        }


def _refuse(checks: list[Check], force: bool) -> None:
    errors = [c for c in checks if not c.ok and c.severity == "error"]
    warnings = [c for c in checks if not c.ok and c.severity == "warning" and c.name != "replace"]
    if not errors and (force or not warnings):
        return
    bad = errors or warnings
    text = "; ".join(f"{c.name}: {c.message}" for c in bad)
    if not errors:
        text += " (warnings: --force to go on)"
    first = bad[0].name
    if first == "space":
        raise ImageRefused(f"preflight: {text}")
    if first in ("boot-code",):
        raise BootloaderError(f"preflight: {text}")
    raise KernelError(f"preflight: {text}")


TMP_PREFIX = ".vimg-rekernel-"


class _Work:
    """The run's lock (one rekernel per DISK at a time) and its temporary overlay directory."""

    def __init__(self, disk: Path, fmt: str | None, workdir: Path | None) -> None:
        from vimgtools.rekernel.overlay import create_overlay, probe_format, refuse_if_in_use

        if not disk.exists():
            raise InvalidInput(f"{disk}: no such file or device")
        self.fmt = fmt or probe_format(disk)
        refuse_if_in_use(disk)
        where = workdir or disk.resolve().parent
        # Two runs on one DISK would each commit an overlay made against the old content: refuse.
        self._lock_path = where / f"{TMP_PREFIX}{disk.name}.lock"
        while True:
            self._lock = open(self._lock_path, "a")  # noqa: SIM115
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise ImageRefused(f"{disk}: another vimgtools rekernel is working on this image") from None
            # The holder before us may have removed the file after we opened it: lock the one on disk.
            try:
                if os.stat(self._lock_path).st_ino == os.fstat(self._lock.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self._lock.close()
        # Overlays left by a run that was killed (its pid is gone) are thrown away: DISK never saw them.
        for stale in where.glob(f"{TMP_PREFIX}{disk.name}-*"):
            pid = stale.name.rsplit("-", 2)[-2]
            if stale.is_dir() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                log.info("removing %s, left by a run that was killed", stale)
                shutil.rmtree(stale, ignore_errors=True)
        self.disk = disk
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{disk.name}-{os.getpid()}-", dir=where))
        try:
            self.overlay = create_overlay(disk, self.fmt, self.tmp)
        except BaseException:
            self.close()
            raise

    def commit(self) -> int:
        from vimgtools.rekernel.overlay import commit_overlay, refuse_if_in_use

        refuse_if_in_use(self.disk)  # a VM started meanwhile must not see its disk change under it
        return commit_overlay(self.overlay, self.disk, self.fmt)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        self._lock.close()


def rekernel(
    disk: str | os.PathLike[str],
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
) -> Result:
    """Swap in the kernel from ``from_dir`` and make it the guest's default; all or nothing.

    Args:
        disk: the guest's disk image (raw is committed crash-atomically; qcow2 via qemu-img commit).
        from_dir: BOOTDIR with ``vmlinuz-VER``, ``modules/VER/`` and optionally config, System.map,
            initramfs.
        fmt: the disk's format (default: probed with qemu-img).
        root: the guest root device when there are several systems.
        version: the kernel to take when ``from_dir`` has several.
        target: hypervisor the guest will run on: "kvm" (virtio) or "xen" (xen-blkfront).
        force: go on despite warnings (never errors).
        dry_run: rehearse everything on the overlay and throw it away.
        regenerate_initramfs: force (True) or forbid (False) making the initramfs in the guest;
            default: only when ``from_dir`` has none.
        workdir: where the temporary overlay goes (default: beside ``disk``).
        progress: called before each step with (index from 1, number of steps, description).

    Raises:
        KernelError, BootloaderError, ImageRefused, InvalidInput: refused before any change (exit 2).
        GuestError, ImageError: failed; ``disk`` is as it was.
    """
    from vimgtools.boot import detect
    from vimgtools.guest.facts import choose_root, collect_facts
    from vimgtools.guest.session import GuestImage
    from vimgtools.rekernel.apply import apply_plan, list_initramfs, verify

    if target not in ("kvm", "xen"):
        raise InvalidInput(f"--target {target}: use kvm or xen")
    t_start = time.monotonic()
    disk = Path(disk)
    if not disk.exists():
        raise InvalidInput(f"{disk}: no such file or device")
    kernel: Kernel = find_kernel(Path(from_dir), version=version)
    log.info("kernel %s (%s) from %s", kernel.version, kernel.arch, kernel.image)
    options = Options(target=target, force=force, regenerate_initramfs=regenerate_initramfs)
    regenerate = regenerate_initramfs if regenerate_initramfs is not None else kernel.initramfs is None
    initrd_files = list_initramfs(kernel.initramfs) if kernel.initramfs and not regenerate else None
    work = _Work(disk, fmt, Path(workdir) if workdir else None)
    result = Result(plan=None, dry_run=dry_run)
    try:
        gi = GuestImage(work.overlay, write=True, fmt="qcow2")
        ok = False
        try:
            result.seconds["launch"] = round(gi.launch_seconds, 2)
            t0 = time.monotonic()
            r = choose_root(gi, root)
            gi.mount_root(r)
            facts = collect_facts(gi, r)
            loader = detect(facts)
            try:
                previous = _version_of(loader.default_entry(gi, facts).kernel)
            except (BootloaderError, GuestError) as e:
                log.warning("cannot tell which kernel the guest boots now: %s", e)
                previous = None
            plan = plan_rekernel(
                facts,
                kernel,
                loader,
                disk=str(disk),
                previous=previous,
                options=options,
                initrd_files=initrd_files,
            )
            result.plan = plan
            result.seconds["inspect"] = round(time.monotonic() - t0, 2)
            log.info("%s", plan.describe(diffs=dry_run))
            _refuse(list(plan.checks), force)
            t1 = time.monotonic()
            result.done = apply_plan(gi, facts, loader, plan, progress)
            result.seconds["apply"] = round(time.monotonic() - t1, 2)
            t2 = time.monotonic()
            result.verified = verify(gi, facts, loader, plan, options)
            result.seconds["verify"] = round(time.monotonic() - t2, 2)
            ok = True
        finally:
            t3 = time.monotonic()
            gi.close(commit=ok)
            result.seconds["shutdown"] = round(time.monotonic() - t3, 2)
        if not dry_run:
            t4 = time.monotonic()
            result.bytes_committed = work.commit()
            result.committed = True
            result.seconds["commit"] = round(time.monotonic() - t4, 2)
    except VimgError as e:
        e.result = result  # type: ignore[attr-defined]  # for --json: what was decided before it failed
        raise
    finally:
        work.close()
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    result.seconds["work"] = round(result.seconds["total"] - result.seconds.get("launch", 0.0), 2)
    return result


def _version_of(kernel_path: str) -> str | None:
    base = kernel_path.rsplit("/", 1)[-1]
    return base[len("vmlinuz-") :] if base.startswith("vmlinuz-") else None


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
            is gone.
    """
    from vimgtools.boot import detect
    from vimgtools.guest.facts import choose_root, collect_facts
    from vimgtools.guest.session import GuestImage

    t_start = time.monotonic()
    disk = Path(disk)
    work = _Work(disk, fmt, Path(workdir) if workdir else None)
    result = Result(plan=None, dry_run=dry_run, action="rollback")
    try:
        gi = GuestImage(work.overlay, write=True, fmt="qcow2")
        ok = False
        try:
            result.seconds["launch"] = round(gi.launch_seconds, 2)
            r = choose_root(gi, root)
            gi.mount_root(r)
            facts = collect_facts(gi, r)
            loader = detect(facts)
            text = gi.text(STATE_FILE)
            if text is None:
                raise InvalidInput(f"{disk}: no {STATE_FILE}: this guest was not rekernelled by vimgtools")
            state = json.loads(text)
            previous, current = state.get("previous"), state.get("version")
            if not previous:
                raise InvalidInput(f"{disk}: {STATE_FILE} does not name a previous kernel")
            if not gi.is_file(f"/boot/vmlinuz-{previous}"):
                raise InvalidInput(f"{disk}: the previous kernel /boot/vmlinuz-{previous} is gone")
            loader.set_default(gi, facts, previous)
            state.update(version=previous, previous=current)
            gi.write(STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")
            gi.remount()
            entry = loader.default_entry(gi, facts)
            if _version_of(entry.kernel) != previous:
                raise GuestError(f"verify: the default entry boots {entry.kernel}, not vmlinuz-{previous}")
            result.done = [{"step": f"{loader.name}: make {previous} the default entry (was {current})"}]
            result.verified = {
                "default_entry": {"title": entry.title, "kernel": entry.kernel, "initrd": entry.initrd}
            }
            ok = True
        finally:
            gi.close(commit=ok)
        if not dry_run:
            result.bytes_committed = work.commit()
            result.committed = True
    except VimgError as e:
        e.result = result  # type: ignore[attr-defined]  # for --json: what was decided before it failed
        raise
    finally:
        work.close()
    result.seconds["total"] = round(time.monotonic() - t_start, 2)
    return result


class _CallableModule(types.ModuleType):
    """Lets ``vimgtools.rekernel(disk, from_dir)`` work although ``vimgtools.rekernel`` is this package."""

    def __call__(self, *args: Any, **kw: Any) -> Result:
        return rekernel(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Result", "VimgError", "rekernel", "rollback"]
