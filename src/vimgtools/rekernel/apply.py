"""Run a Plan's steps on a GuestImage (one ``match`` loop), then verify by re-reading the disk."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vimgtools.boot import Bootloader
from vimgtools.errors import GuestError, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.session import GuestImage
from vimgtools.guest.steps import (
    InstallModules,
    Mkdir,
    Move,
    RemoveDir,
    Run,
    SetDefault,
    Step,
    Symlink,
    Upload,
    Write,
)
from vimgtools.kernel import read_bzimage_header
from vimgtools.rekernel.plan import DISK_DRIVERS, FS_DRIVERS, MODULES_HOME, Options, Plan, initramfs_has

log = logging.getLogger("vimgtools.rekernel")


def list_initramfs(path: Path) -> list[str]:
    """Files in an initramfs, listed on the host with ``lsinitramfs`` (libguestfs 1.48 cannot read zstd)."""
    exe = shutil.which("lsinitramfs")
    if exe is None:
        raise KernelError("lsinitramfs is missing on this host (Debian/Ubuntu: initramfs-tools-core)")
    try:
        out = subprocess.run([exe, str(path)], check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as e:
        raise KernelError(f"{path}: cannot list the initramfs: {e.stderr.strip()[-500:]}") from e
    return out.stdout.splitlines()


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


def install_modules(gi: GuestImage, src: Path, dst: str, version: str) -> None:
    """Copy a module tree into the guest (links stay links), with depmod run on the host first."""
    with tempfile.TemporaryDirectory(prefix="vimg-modules-") as tmp:
        tar = prepare_modules(src, version, Path(tmp))
        if gi.exists(dst):
            gi.rm_rf(dst)
        gi.mkdir_p(dst)
        gi.tar_in(str(tar), dst)


def run_step(gi: GuestImage, facts: GuestFacts, loader: Bootloader, step: Step) -> None:
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
        case Run(argv, _why):
            gi.run(list(argv))
        case SetDefault(_name, version):
            loader.set_default(gi, facts, version)
        case _:
            raise TypeError(f"unknown step {step!r}")


def apply_plan(
    gi: GuestImage,
    facts: GuestFacts,
    loader: Bootloader,
    plan: Plan,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every step; returns what was done with timings. Stops at the first failure (raises).

    Args:
        progress: called before each step with (index from 1, number of steps, description).
    """
    done: list[dict[str, Any]] = []
    for i, step in enumerate(plan.steps, 1):
        if progress is not None:
            progress(i, len(plan.steps), step.describe())
        t0 = time.monotonic()
        run_step(gi, facts, loader, step)
        done.append({"step": step.describe(), "seconds": round(time.monotonic() - t0, 3)})
    return done


def find_initramfs(gi: GuestImage, version: str) -> str | None:
    for name in (f"initrd.img-{version}", f"initramfs-{version}.img", f"initrd-{version}"):
        if gi.is_file(f"/boot/{name}"):
            return f"/boot/{name}"
    return None


def verify(
    gi: GuestImage, facts: GuestFacts, loader: Bootloader, plan: Plan, options: Options
) -> dict[str, Any]:
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
    result["default_entry"] = {"title": entry.title, "kernel": entry.kernel, "initrd": entry.initrd}
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
        missing = []
        wanted = list(DISK_DRIVERS.get(options.target, ()))
        fs = FS_DRIVERS.get(facts.fs_types.get("/", ""))
        if fs:
            wanted.append(fs)
        for _symbol, module in wanted:
            check = next((c for c in plan.checks if c.name == f"driver:{module}"), None)
            if check and check.message.startswith("module") and not initramfs_has(files, module):
                missing.append(module)
        if missing:
            raise GuestError(f"verify: the regenerated initramfs {initrd} lacks {', '.join(missing)}")
        result["initramfs_files"] = len(files)
    return result
