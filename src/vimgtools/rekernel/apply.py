"""Run a Plan's steps on a Guest (one ``match`` loop), then verify by re-reading the disk.

The runner stops at the first step that fails and raises; what the steps did stays in the guest's
work overlay, which the caller throws away (``rekernel.session``): that is the undo. ``done`` lists
the steps that completed, also when a later one failed.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vimgtools.boot import BootEntry, Bootloader
from vimgtools.errors import GuestError, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.protocol import Guest
from vimgtools.guest.steps import (
    InstallModules,
    Mkdir,
    MountView,
    Move,
    Remove,
    RemoveDir,
    RunCommand,
    SetDefault,
    Step,
    Symlink,
    Upload,
    Write,
)
from vimgtools.kernel import initramfs_has, list_initramfs, read_bzimage_header
from vimgtools.rekernel.plan import MODULES_HOME, Plan, version_of

log = logging.getLogger("vimgtools.rekernel")


def prepare_modules(src: Path, version: str, tmp: Path) -> Path:
    """A tarball of the module tree with modules.dep & co. made by ``depmod -b`` on the host.

    Symlinks in the tree (``build``, ``source``) stay links: never followed out of BOOTDIR.
    """
    base = tmp / "root"
    tree = base / "lib" / "modules" / version
    t0 = time.monotonic()
    shutil.copytree(src, tree, symlinks=True)
    depmod = shutil.which("depmod") or "/sbin/depmod"
    try:
        subprocess.run([depmod, "-b", str(base), version], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelError(f"{src}: depmod -b failed: {getattr(e, 'stderr', '') or e}") from e
    tar = tmp / "modules.tar"
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(tar), "."], check=True)
    log.debug("modules prepared on the host in %.1f s", time.monotonic() - t0)
    return tar


def install_modules(gi: Guest, src: Path, dst: str, version: str) -> None:
    """Copy a module tree into the guest (links stay links), with depmod run on the host first."""
    with tempfile.TemporaryDirectory(prefix="vimg-modules-") as tmp:
        tar = prepare_modules(src, version, Path(tmp))
        if gi.exists(dst):
            gi.rm_rf(dst)
        gi.mkdir_p(dst)
        gi.tar_in(str(tar), dst)


def run_step(gi: Guest, facts: GuestFacts, loader: Bootloader, step: Step) -> None:
    log.info("%s", step.describe())
    match step:
        case Mkdir(path):
            gi.mkdir_p(path)
        case Upload(src, dst):
            gi.upload(src, dst)
        case InstallModules(src, dst, version):
            install_modules(gi, Path(src), dst, version)
        case Move(src, dst):
            gi.mv(src, dst)
        case RemoveDir(path):
            gi.rmdir(path)
        case Remove(path, _why):
            gi.rm_f(path)
        case Symlink(target, link):
            # ln_sf onto an existing directory would put the link inside it: remove, then link, then check.
            if gi.is_symlink(link) or gi.is_file(link):
                gi.rm_f(link)
            if gi.is_dir(link):
                raise GuestError(f"{link}: a directory is still there, cannot make it a link to {target}")
            gi.ln_s(target, link)
            if gi.readlink(link) != target:
                raise GuestError(f"{link}: points to {gi.readlink(link)!r}, not {target}")
        case Write(path, text, _old, mode):
            gi.write(path, text.encode())
            gi.chmod(mode, path)
        case RunCommand(argv, _why, attempts):
            for attempt in range(1, attempts + 1):
                try:
                    gi.run(list(argv))
                    break
                except GuestError as e:
                    if attempt == attempts:
                        raise
                    log.warning("%s failed (try %d of %d), trying again: %s", argv[0], attempt, attempts, e)
        case SetDefault(_name, version):
            loader.set_default(gi, facts, version)
        case MountView(_guest, mountpoints):
            gi.mount_view(dict(mountpoints))
        case _:
            raise TypeError(f"unknown step {step!r}")


def apply_plan(
    gi: Guest,
    facts: GuestFacts,
    loader: Bootloader,
    plan: Plan,
    progress: Callable[[int, int, str], None] | None = None,
    *,
    done: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every step; returns what was done with timings. Stops at the first failure (raises).

    Args:
        progress: called before each step with (index from 1, number of steps, description).
        done: the list to append each completed step to (default: a new one), so that the caller
            still has it when a later step fails.
    """
    if done is None:
        done = []
    for i, step in enumerate(plan.steps, 1):
        if progress is not None:
            progress(i, len(plan.steps), step.describe())
        t0 = time.monotonic()
        run_step(gi, facts, loader, step)
        done.append({"step": step.describe(), "seconds": round(time.monotonic() - t0, 3)})
    return done


def find_initramfs(gi: Guest, version: str) -> str | None:
    for name in (f"initrd.img-{version}", f"initramfs-{version}.img", f"initrd-{version}"):
        if gi.is_file(f"/boot/{name}"):
            return f"/boot/{name}"
    return None


def _entry_dict(entry: BootEntry) -> dict[str, Any]:
    return {"title": entry.title, "kernel": entry.kernel, "initrd": entry.initrd}


def verify(gi: Guest, facts: GuestFacts, loader: Bootloader, plan: Plan) -> dict[str, Any]:
    """Re-read the disk (unmount, drop caches, mount) and check that the guest will boot ``plan.version``.

    Raises:
        GuestError: something is missing or points nowhere; the message says what.
    """
    gi.remount()
    v = plan.version
    result: dict[str, Any] = {}
    kernel = f"/boot/vmlinuz-{v}"
    if not gi.is_file(kernel):
        raise GuestError(f"verify: {kernel} is missing")
    hdr = read_bzimage_header(gi.pread(kernel, 1 << 16, 0), name=kernel)
    if hdr.version != v:
        raise GuestError(f"verify: {kernel} says {hdr.version}")
    initrd = find_initramfs(gi, v)
    if initrd is None:
        raise GuestError(f"verify: no initramfs for {v} in /boot")
    result["kernel"] = kernel
    result["initramfs"] = initrd
    for link in ("/lib/modules", "/usr/lib/modules"):
        if gi.exists(link) or gi.is_symlink(link):
            real = gi.realpath(link)
            if real != gi.realpath(MODULES_HOME):
                raise GuestError(f"verify: {link} resolves to {real}, not {MODULES_HOME}")
    if not gi.is_file(f"/lib/modules/{v}/modules.dep"):
        raise GuestError(f"verify: /lib/modules/{v}/modules.dep does not resolve")
    if gi.exists("/lib/modules/modules"):
        raise GuestError("verify: a stray /lib/modules/modules link (ln -sf onto a directory)")
    result["modules"] = gi.realpath(f"/lib/modules/{v}")
    entry = loader.default_entry(gi, facts)
    if entry.kernel.rsplit("/", 1)[-1] != f"vmlinuz-{v}":
        raise GuestError(
            f"verify: the default {loader.name} entry {entry.title!r} boots {entry.kernel}, not {kernel}"
        )
    if not gi.is_file(entry.kernel):
        raise GuestError(f"verify: the default entry's kernel {entry.kernel} does not exist")
    if entry.initrd and not gi.is_file(entry.initrd):
        raise GuestError(f"verify: the default entry's initramfs {entry.initrd} does not exist")
    result["default_entry"] = _entry_dict(entry)
    if plan.previous:
        kept = [e for e in loader.entries(gi, facts) if e.kernel.endswith(f"vmlinuz-{plan.previous}")]
        result["fallback_entry"] = kept[0].title if kept else None
        if not kept:
            log.warning("verify: no boot entry is left for the previous kernel %s", plan.previous)
    if plan.initramfs.startswith("regenerate"):
        # The initramfs made in the guest must carry the root's drivers: read it on the host.
        with tempfile.TemporaryDirectory(prefix="vimg-initrd-") as tmp:
            local = Path(tmp) / "initrd"
            gi.download(initrd, str(local))
            files = list_initramfs(local)
        missing = [m for m in plan.initramfs_modules if not initramfs_has(files, m)]
        if missing:
            raise GuestError(f"verify: the regenerated initramfs {initrd} lacks {', '.join(missing)}")
        result["initramfs_files"] = len(files)
    return result


def verify_rollback(gi: Guest, facts: GuestFacts, loader: Bootloader, plan: Plan) -> dict[str, Any]:
    """Re-read the disk and check that the loader's default entry boots ``plan.version`` again.

    Raises:
        GuestError: the default entry boots another kernel.
    """
    gi.remount()
    entry = loader.default_entry(gi, facts)
    if version_of(entry.kernel) != plan.version:
        raise GuestError(f"verify: the default entry boots {entry.kernel}, not vmlinuz-{plan.version}")
    return {"default_entry": _entry_dict(entry)}
