"""Xen -> KVM: from the inventory, the checks and the steps that make a guest moved off Xen boot on KVM.

Pure, as ``plan``: everything comes in as data (``guest.inventory.collect_inventory``, the facts,
the host's listing of an initramfs); nothing here reads a file or the guest. What it changes:

- fstab and crypttab entries naming ``/dev/xvd*`` (or a prefix given with ``--map OLD=NEW``) become
  ``UUID=`` of the filesystem really found on that disk; ``root=`` and ``resume=`` in every command
  line the same way. An entry that resolves to no filesystem, or to two, is refused unless it is
  ``nofail``/``noauto`` (then it is commented out);
- ``console=hvc0``/``xvc0`` becomes ``console=tty0 console=ttyS0,115200`` and ``xencons=`` goes, in
  every ``GRUB_CMDLINE_LINUX*`` of ``/etc/default/grub`` and ``/etc/sysconfig/grub``, every
  ``*APPEND`` of SUSE's ``/etc/sysconfig/bootloader``, extlinux ``APPEND``, menu.lst ``kernel``,
  BLS ``options`` and grub.cfg ``linux`` lines; inittab and securetty lines move to ttyS0; enabled
  ``serial-getty@hvc0``/``xvc0`` links go;
- the initramfs generator's module lists (initramfs-tools ``modules``, dracut ``*drivers``, SUSE
  ``INITRD_MODULES``/``DOMU_INITRD_MODULES``) lose the Xen-only drivers and get the virtio ones and
  the root and ``/usr`` filesystem drivers; modprobe aliases to Xen-only drivers are commented out;
- the NIC keeps its configured name (a systemd ``.link`` matching the virtio NIC, or a udev rule),
  stale ``70-persistent-net.rules`` lines for Xen vifs go;
- a partitioned disk without boot code gets the guest's own loader's (``grub-install`` for i386-pc,
  or syslinux's ``mbr.bin``); a partitionless one is refused with the way out (direct kernel boot).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from vimgtools.errors import BootloaderError, InvalidInput, KernelError
from vimgtools.guest.facts import GuestFacts
from vimgtools.guest.inventory import GuestKernel, Inventory
from vimgtools.guest.steps import Mkdir, Remove, RunCommand, Step, Upload, Write
from vimgtools.kernel import initramfs_has
from vimgtools.rekernel.plan import FS_DRIVERS, Check, Plan, initramfs_tool

XEN_ONLY = frozenset({"xenblk", "xen_blkfront", "xennet", "xen_netfront", "xen_vbd", "xen_vnif"})
VIRTIO = (
    ("CONFIG_VIRTIO_PCI", "virtio_pci"),
    ("CONFIG_VIRTIO_BLK", "virtio_blk"),
    ("CONFIG_SCSI_VIRTIO", "virtio_scsi"),
    ("CONFIG_VIRTIO_NET", "virtio_net"),
)
XEN_CONSOLES = ("hvc0", "xvc0")
KVM_CONSOLES = ("console=tty0", "console=ttyS0,115200")
XVD = re.compile(r"^/dev/xvd([a-z]+)(p?\d*)$")
# What verify and the markers look for.
XEN_WORDS = re.compile(r"/dev/xvd|\bhvc0\b|\bxvc0\b|\bxencons=")
LINK_DIR = "/etc/systemd/network"
LOADER_CODE = {"grub2": "grub", "extlinux": "syslinux"}  # what GuestFacts.boot_code says for each
DRACUT_CONF = "/etc/dracut.conf.d/90-vimgtools-kvm.conf"
SPECIAL_FS = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "none", "devtmpfs", "cgroup", "securityfs", "efivarfs"}
)


def _norm(module: str) -> str:
    return module.replace("-", "_")


def is_xen_only(module: str) -> bool:
    return _norm(module) in XEN_ONLY


def nic_link(name: str, *, systemd: bool = True) -> tuple[str, str]:
    """(path, text) of the file that gives the virtio NIC the name ``name``."""
    if systemd:
        return (
            f"{LINK_DIR}/10-vimgtools-{name}.link",
            "# Written by vimgtools rekernel --target kvm: the name this guest's network configuration\n"
            "# expects, for the virtio NIC that replaced its Xen vif.\n"
            f"[Match]\nDriver=virtio_net\n\n[Link]\nName={name}\n",
        )
    return (
        f"/etc/udev/rules.d/70-vimgtools-{name}.rules",
        "# Written by vimgtools rekernel --target kvm: keep the name the network configuration expects.\n"
        f'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="virtio_net", NAME="{name}"\n',
    )


def parse_maps(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``--map OLD=NEW`` values -> pairs; OLD a guest device prefix, NEW a disk as the appliance names it.

    Raises:
        InvalidInput: not ``/dev/X=/dev/Y``.
    """
    out = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.startswith("/dev/") or not new.startswith("/dev/"):
            raise InvalidInput(f"--map {item}: use OLD=NEW, e.g. /dev/hda=/dev/sda")
        out.append((old.rstrip("/"), new.rstrip("/")))
    return tuple(out)


class Resolver:
    """Old guest device names -> ``UUID=`` of the filesystem found on the disk they now name."""

    xvd_as = "/dev/sd"  # what /dev/xvdXN becomes: the appliance's name of the Xth disk

    def __init__(self, inv: Inventory, maps: tuple[tuple[str, str], ...] = ()) -> None:
        self.inv = inv
        self.maps = sorted(maps, key=lambda m: -len(m[0]))

    def device(self, name: str) -> str | None:
        """The appliance device an old name now is, or None when the name is not one we rewrite."""
        for old, new in self.maps:
            if name == old or (name.startswith(old) and re.fullmatch(r"p?\d+", name[len(old) :])):
                return new + name[len(old) :].lstrip("p")
        m = XVD.match(name)
        if m:
            return f"{self.xvd_as}{m.group(1)}{m.group(2).lstrip('p')}"
        return None

    def needs(self, spec: str) -> bool:
        return self.device(spec) is not None

    def resolve(self, spec: str) -> tuple[str | None, str]:
        """(``UUID=...``, why) for an old name; (None, why not) when it resolves to none or to two."""
        dev = self.device(spec)
        if dev is None:
            return spec, "kept"
        fs = self.inv.filesystems.get(dev)
        if fs is None:
            return None, f"{spec} would be {dev}, which holds no filesystem"
        if not fs.uuid:
            return None, f"{spec} is {dev} ({fs.type}), which has no UUID"
        same = self.inv.by_uuid(fs.uuid)
        if len(same) > 1:
            return None, f"{spec} is {dev}, but {len(same)} filesystems have UUID {fs.uuid}"
        return f"UUID={fs.uuid}", f"{spec} is {dev}"

    def resolves(self, spec: str) -> bool:
        """Whether an fstab spec (UUID=, LABEL=, a device) names exactly one filesystem."""
        if spec.startswith("UUID="):
            return len(self.inv.by_uuid(spec[5:].strip("\"'"))) == 1
        if spec.startswith("LABEL="):
            return len(self.inv.by_label(spec[6:].strip("\"'"))) == 1
        if spec.startswith("/dev/"):
            dev = self.device(spec) or spec
            return dev in self.inv.filesystems or spec.startswith(("/dev/mapper/", "/dev/disk/"))
        return True  # PARTUUID=, network filesystems: not ours to judge


# -- pure text edits ---------------------------------------------------------------------------------
def edit_cmdline(args: str, r: Resolver, problems: list[str], where: str) -> str:
    """A kernel command line with root=/resume= resolved, Xen consoles replaced, xencons= dropped."""
    words = args.split()
    out: list[str] = []
    has_serial = any(w.startswith("console=ttyS0") for w in words)
    added = False
    for w in words:
        key, _, value = w.partition("=")
        if key in ("root", "resume") and r.needs(value):
            new, why = r.resolve(value)
            if new is None:
                problems.append(f"{where}: {key}={value}: {why}")
            else:
                w = f"{key}={new}"
        elif key == "console" and value.split(",")[0] in XEN_CONSOLES:
            if not added:
                out.extend(c for c in KVM_CONSOLES if not (has_serial and c.startswith("console=ttyS0")))
                added = True
            continue
        elif key == "xencons":
            continue
        out.append(w)
    return " ".join(out)


def _edit_value(value: str, edit: Callable[[str], str]) -> str:
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[0] + edit(v[1:-1]) + v[0]
    return shlex.quote(edit(v)) if v else v


def edit_shell_vars(text: str, name: str, edit: Callable[[str], str]) -> str:
    """Apply ``edit`` to the value of every ``NAME=value`` line whose NAME matches the regex ``name``."""
    pat = re.compile(rf"^(\s*(?:export\s+)?)({name})=(.*)$", re.M)
    return pat.sub(lambda m: f"{m.group(1)}{m.group(2)}={_edit_value(m.group(3), edit)}", text)


def edit_cmdline_file(path: str, text: str, r: Resolver, problems: list[str]) -> str:
    """Every kernel command line in one configuration file, by the file's kind."""

    def ed(args: str) -> str:
        return edit_cmdline(args, r, problems, path)

    base = posixpath.basename(path)
    if path in ("/etc/default/grub", "/etc/sysconfig/grub"):
        return edit_shell_vars(text, r"GRUB_CMDLINE_LINUX\w*", ed)
    if path == "/etc/sysconfig/bootloader":
        return edit_shell_vars(text, r"\w*APPEND\w*", ed)
    if path.startswith("/boot/loader/entries/"):
        return re.sub(r"^(\s*options\s+)(.*)$", lambda m: m.group(1) + ed(m.group(2)), text, flags=re.M)
    if base in ("menu.lst", "grub.conf"):
        return re.sub(
            r"^(\s*kernel\s+\S+)(.*)$", lambda m: m.group(1) + " " + ed(m.group(2)).strip(), text, flags=re.M
        ).replace("\n", "\n")
    if base == "grub.cfg":
        return re.sub(
            r"^(\s*linux(?:16|efi)?\s+\S+)(.*)$", lambda m: f"{m.group(1)} {ed(m.group(2))}", text, flags=re.M
        )
    if "linux" in base and base.endswith((".conf", ".cfg")):  # extlinux.conf, syslinux.cfg
        return re.sub(r"^(\s*append\s+)(.*)$", lambda m: m.group(1) + ed(m.group(2)), text, flags=re.M | re.I)
    return text


CMDLINE_FILES = re.compile(
    r"^(/etc/default/grub|/etc/sysconfig/grub|/etc/sysconfig/bootloader|/boot/loader/entries/.*\.conf|"
    r".*/(menu\.lst|grub\.conf|grub\.cfg|extlinux\.conf|syslinux\.cfg))$"
)


def _opts_say(options: str, *words: str) -> bool:
    return any(w in options.split(",") for w in words)


def edit_table(
    path: str, text: str, r: Resolver, problems: list[str], *, spec_field: int, opts_field: int
) -> str:
    """fstab (spec field 0) or crypttab (source field 1): old device names -> UUID=."""
    out = []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) <= spec_field:
            out.append(line)
            continue
        spec = fields[spec_field]
        opts = fields[opts_field] if len(fields) > opts_field else ""
        optional = _opts_say(opts, "nofail", "noauto")
        if r.needs(spec):
            new, why = r.resolve(spec)
            if new is not None:
                line = re.sub(rf"(?<!\S){re.escape(spec)}(?!\S)", new, line, count=1)
            elif optional:
                line = f"# vimgtools: no filesystem for it on KVM ({why}): {line}"
            else:
                problems.append(f"{path}: {spec} ({fields[1] if spec_field == 0 else fields[0]}): {why}")
        elif (
            spec_field == 0
            and fields[2:3] != ["swap"]
            and spec not in SPECIAL_FS
            and not r.resolves(spec)
            and not optional
        ):
            problems.append(f"{path}: {spec} ({fields[1] if len(fields) > 1 else '?'}) names no filesystem")
        out.append(line)
    return "".join(out)


def edit_inittab(text: str) -> str:
    has_serial = re.search(r"^[^#\n]*\bttyS0\b", text, re.M) is not None
    out = []
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("#") and re.search(r"\b(hvc0|xvc0)\b", line):
            if has_serial:
                line = "# vimgtools (Xen console): " + line
            else:
                line = re.sub(r"\b(hvc0|xvc0)\b", "ttyS0", line)
                ident, sep, rest = line.partition(":")
                if sep and len(ident) > 4:
                    line = "S0:" + rest
                has_serial = True
        out.append(line)
    return "".join(out)


def edit_securetty(text: str) -> str:
    lines = text.splitlines()
    out = [ln for ln in lines if ln.strip() not in XEN_CONSOLES]
    if len(out) != len(lines) and "ttyS0" not in (ln.strip() for ln in out):
        out.append("ttyS0")
    return "\n".join(out) + "\n"


def edit_module_words(words: list[str], add: list[str]) -> list[str]:
    kept = [w for w in words if not is_xen_only(w)]
    have = {_norm(w) for w in kept}
    return kept + [m for m in add if _norm(m) not in have]


def edit_initramfs_tools_modules(text: str | None, add: list[str]) -> str:
    out = []
    have = set()
    for line in (text or "").splitlines():
        word = line.split("#", 1)[0].split()
        if word and is_xen_only(word[0]):
            continue
        if word:
            have.add(_norm(word[0]))
        out.append(line)
    if any(_norm(m) not in have for m in add):
        out.append("# for KVM (vimgtools rekernel --target kvm)")
        out.extend(m for m in add if _norm(m) not in have)
    return "\n".join(out) + "\n"


def edit_word_vars(text: str, name: str, add: list[str] | None) -> str:
    """Shell variables holding module lists: Xen-only words out, ``add`` in (when given)."""

    def edit(v: str) -> str:
        words = " ".join(edit_module_words(v.split(), add or []))
        if v[:1].isspace() or v[-1:].isspace():  # dracut's " a b " convention: keep the padding
            return f" {words} " if words else " "
        return words

    return edit_shell_vars(text, name, edit)


def edit_modprobe(text: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        w = line.split()
        if w and w[0] in ("alias", "install", "options", "softdep") and any(is_xen_only(x) for x in w[1:3]):
            line = "# vimgtools (Xen only): " + line
        out.append(line)
    return "".join(out)


def edit_persistent_net(text: str) -> str:
    return "".join(
        ln
        for ln in text.splitlines(keepends=True)
        if ln.lstrip().startswith("#") or not ('DRIVERS=="vif"' in ln or '"00:16:3e:' in ln.lower())
    )


def nic_names(inv: Inventory) -> list[str]:
    """The NIC names the guest's network configuration expects (ifupdown, networkd, SUSE ifcfg)."""
    names: list[str] = []
    text = inv.text("/etc/network/interfaces") or ""
    for m in re.finditer(r"^[ \t]*(?:auto|allow-hotplug|iface)[ \t]+([^\s#]+(?:[ \t]+[^\s#]+)*)", text, re.M):
        words = m.group(1).split()
        for n in words[:1] if m.group(0).lstrip().startswith("iface") else words:
            if n != "lo" and n not in names:
                names.append(n)
    for path, body in sorted(inv.files.items()):
        if path.startswith(f"{LINK_DIR}/") and path.endswith(".network"):
            nm = re.search(r"^\s*Name\s*=\s*(\S+)\s*$", body, re.M)
            if nm and not any(c in nm.group(1) for c in "*?[ ") and nm.group(1) not in names:
                names.append(nm.group(1))
        if path.startswith("/etc/sysconfig/network/ifcfg-"):
            n = path.rsplit("ifcfg-", 1)[1]
            if n != "lo" and n not in names:
                names.append(n)
    return names


def boot_disk_sh(mounts: str = "/proc/mounts") -> str:
    """Shell that sets ``$d`` to the whole disk holding ``/boot`` (or ``/``) as the appliance chroot's
    ``mounts`` names it: a partition loses its number (``/dev/sda1``, ``/dev/nvme0n1p2``); a logical
    volume (``/dev/mapper/...``, ``/dev/VG/LV``, ``/dev/dm-N``) is followed down to its disk by
    ``lsblk -s`` (a root on LVM without a separate ``/boot``)."""
    return (
        f'p=$(awk \'$2=="/boot"{{b=$1}} $2=="/"{{r=$1}} END{{print b?b:r}}\' {mounts}); '
        'case "$p" in /dev/mapper/*|/dev/dm-*|/dev/*/*) '
        'd=$(lsblk -lnsp -o NAME,TYPE "$p" | awk \'$2=="disk"{print $1; exit}\');; '
        "*) d=$(echo \"$p\" | sed -E 's/p?[0-9]+$//');; esac; "
    )


# -- the planner ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetargetOptions:
    maps: tuple[tuple[str, str], ...] = ()
    regenerate: bool = True  # make the initramfs in the guest; False: ``supplied`` is checked
    supplied: str | None = None  # host path of an initramfs to install (None: the guest's is checked)


@dataclass
class Retarget:
    """The Xen -> KVM part of a plan: checks, config edits, later steps, and what verify looks for."""

    xen: bool
    checks: list[Check]
    edits: list[Step]  # configuration, before any kernel or initramfs step
    boot: list[Step]  # the booting kernel's initramfs (retarget only), after the edits
    required: list[str]  # drivers the initramfs of the booting kernel must carry (modules)
    info: dict[str, Any] = field(default_factory=dict)
    code: list[Step] = field(default_factory=list)  # boot code, last


def xen_markers(inv: Inventory, r: Resolver) -> list[str]:
    found = []
    for path, text in sorted(inv.files.items()):
        body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
        if XEN_WORDS.search(body) and (
            CMDLINE_FILES.match(path)
            or path in ("/etc/fstab", "/etc/crypttab", "/etc/inittab", "/etc/securetty")
        ):
            found.append(f"{path}: Xen device or console names")
        elif path in ("/etc/fstab", "/etc/crypttab") and any(r.needs(w) for w in body.split()):
            found.append(f"{path}: device names under --map")
        elif re.search(
            r"\b(xenblk|xen-blkfront|xen_blkfront|xennet|xen-netfront|xen-vbd|xen-vnif)\b", body
        ) and (
            "initramfs-tools" in path
            or "dracut" in path
            or path == "/etc/sysconfig/kernel"
            or "modprobe" in path
        ):
            found.append(f"{path}: Xen-only drivers")
    found.extend(
        f"{link}: a getty on a Xen console" for link in inv.getty_links if "@hvc0" in link or "@xvc0" in link
    )
    return found


def plan_xen(
    facts: GuestFacts,
    inv: Inventory,
    loader: str,
    *,
    version: str,
    kernel: GuestKernel | None,
    new_kernel_state: Callable[[str, str], str] | None = None,
    initrd_path: str | None,
    initrd_files: list[str] | None,
    initrd_texts: dict[str, str] | None,
    options: RetargetOptions,
) -> Retarget:
    """The checks and steps that retarget the guest to KVM (pure).

    Args:
        version: the kernel the guest will boot (its own default, or the one from ``--from``).
        kernel: that kernel as found in the guest (None when it comes from ``--from``).
        new_kernel_state: ``Kernel.driver_state`` of the ``--from`` kernel (None: retarget only).
        initrd_path: where the booting kernel's initramfs is in the guest.
        initrd_files, initrd_texts: the supplied initramfs's listing and baked-in config (host).
    """
    r = Resolver(inv, options.maps)
    markers = xen_markers(inv, r)
    checks: list[Check] = []
    edits: list[Step] = []
    boot: list[Step] = []
    info: dict[str, Any] = {"markers": markers, "inventory": inv.summary(), "rewrites": {}}
    if not markers:
        checks.append(
            Check("xen", True, "no Xen device, console or driver configuration found: nothing to retarget")
        )
        return Retarget(False, checks, [], [], [], info)
    code: list[Step] = []
    checks.append(Check("xen", True, f"{len(markers)} Xen settings found: " + "; ".join(markers)))
    problems: list[str] = []
    # The kernel that will boot: not PV-only, and able to drive virtio.
    state = new_kernel_state or (kernel.driver_state if kernel else None)
    if kernel is not None and new_kernel_state is None:
        checks.append(
            Check(
                "kernel-pv",
                not kernel.pv_only,
                f"{version} is a Xen PV-only (xenified) kernel: it cannot boot on KVM; give a KVM-capable "
                "kernel with --from BOOTDIR"
                if kernel.pv_only
                else f"{version} is not a PV-only kernel",
            )
        )
    wanted = list(VIRTIO)
    for mp in ("/", "/usr"):
        fs = FS_DRIVERS.get(facts.fs_types.get(mp, ""))
        if fs and fs not in wanted:
            wanted.append(fs)
    required: list[str] = []
    force_in: list[str] = []
    for symbol, module in wanted:
        st = state(symbol, module) if state else "module"
        if new_kernel_state is None or module == "virtio_net":
            checks.append(
                Check(
                    f"kvm-driver:{module}",
                    st != "missing",
                    f"{symbol} is neither built in nor a module of {version}" if st == "missing" else st,
                )
            )
        if st == "module":
            force_in.append(module)
            if module != "virtio_net":
                required.append(module)
    # Devices: fstab, crypttab, every command line.
    for path, spec_field, opts_field in (("/etc/fstab", 0, 3), ("/etc/crypttab", 1, 3)):
        old = inv.text(path)
        if old is not None:
            new = edit_table(path, old, r, problems, spec_field=spec_field, opts_field=opts_field)
            if new != old:
                edits.append(Write(path, new, old))
    root_line = next(
        (ln.split() for ln in (inv.text("/etc/fstab") or "").splitlines() if ln.split()[1:2] == ["/"]), None
    )
    for path in sorted(p for p in inv.files if CMDLINE_FILES.match(p)):
        old = inv.files[path]
        new = edit_cmdline_file(path, old, r, problems)
        if new != old:
            edits.append(Write(path, new, old))
    root_problems = [p for p in problems if "(/)" in p or ": root=" in p]
    checks.append(
        Check(
            "root",
            not root_problems,
            "; ".join(root_problems) + " (name the disk with --map OLD=NEW)"
            if root_problems
            else f"/ is {root_line[0] if root_line else '?'}"
            + (f" -> {r.resolve(root_line[0])[0]}" if root_line and r.needs(root_line[0]) else ""),
            refuses_as=InvalidInput,
        )
    )
    other = [p for p in problems if p not in root_problems]
    checks.append(
        Check(
            "devices",
            not other,
            "; ".join(other) + " (mark it nofail, or name the disk with --map OLD=NEW)"
            if other
            else "every entry resolves",
            refuses_as=InvalidInput,
        )
    )
    info["rewrites"] = {
        spec: r.resolve(spec)[0]
        for spec in sorted(
            {
                w
                for t in (inv.text("/etc/fstab"), inv.text("/etc/crypttab"))
                for w in (t or "").split()
                if r.needs(w)
            }
        )
    }
    # Consoles.
    for path, fn in (("/etc/inittab", edit_inittab), ("/etc/securetty", edit_securetty)):
        old = inv.text(path)
        if old is not None and (new := fn(old)) != old:
            edits.append(Write(path, new, old))
    for link in sorted(inv.getty_links):
        if "@hvc0" in link or "@xvc0" in link:
            edits.append(Remove(link, "a getty on a Xen console"))
    # The initramfs generator's module lists and modprobe aliases.
    gen = "none"
    if "/etc/initramfs-tools/initramfs.conf" in inv.files or facts.has_tool("update-initramfs"):
        gen = "initramfs-tools"
        old = inv.text("/etc/initramfs-tools/modules")
        new = edit_initramfs_tools_modules(old, force_in)
        if new != old:
            edits.append(Write("/etc/initramfs-tools/modules", new, old))
    if "/etc/sysconfig/kernel" in inv.files:
        gen = "mkinitrd" if gen == "none" else gen
        old = inv.files["/etc/sysconfig/kernel"]
        new = edit_word_vars(old, "INITRD_MODULES", force_in)
        new = edit_word_vars(new, "DOMU_INITRD_MODULES", None)
        if new != old:
            edits.append(Write("/etc/sysconfig/kernel", new, old))
    if facts.has_tool("dracut") or any(p.startswith("/etc/dracut.conf") for p in inv.files):
        gen = "dracut" if gen in ("none", "mkinitrd") else gen
        for path in sorted(p for p in inv.files if p.startswith("/etc/dracut.conf") and p != DRACUT_CONF):
            old = inv.files[path]
            new = edit_word_vars(old, r"(?:add_|force_)?drivers\+?", None)
            if new != old:
                edits.append(Write(path, new, old))
        text = (
            "# Written by vimgtools rekernel --target kvm: the drivers to boot on KVM, in every initramfs.\n"
            f'force_drivers+=" {" ".join(force_in)} "\nhostonly="no"\n'
        )
        edits.append(Mkdir(posixpath.dirname(DRACUT_CONF)))
        edits.append(Write(DRACUT_CONF, text, inv.text(DRACUT_CONF)))
    for path in sorted(p for p in inv.files if p == "/etc/modprobe.conf" or p.startswith("/etc/modprobe.d/")):
        old = inv.files[path]
        if (new := edit_modprobe(old)) != old:
            edits.append(Write(path, new, old))
    info["initramfs_generator"] = gen
    # The NIC's name.
    names = nic_names(inv)
    info["nics"] = names
    link_name: str | None = None
    if len(names) == 1:
        path, text = nic_link(names[0], systemd=inv.systemd_udev)
        link_name = path
        edits.append(Mkdir(posixpath.dirname(path)))
        edits.append(Write(path, text, inv.text(path)))
        checks.append(
            Check(
                "nic",
                True,
                f"the virtio NIC is named {names[0]}, as the network configuration expects ({path})",
            )
        )
    elif names:
        checks.append(
            Check(
                "nic",
                False,
                f"several NICs configured ({', '.join(names)}): name them for virtio yourself (.link files by MAC)",
                "warning",
                refuses_as=None,
            )
        )
    old = inv.text("/etc/udev/rules.d/70-persistent-net.rules")
    if old is not None and (new := edit_persistent_net(old)) != old:
        edits.append(Write("/etc/udev/rules.d/70-persistent-net.rules", new, old))
    info["nic_link"] = link_name
    # The initramfs of the booting kernel (only retarget-only plans decide it here).
    if new_kernel_state is None:
        if initrd_path is None:
            checks.append(
                Check("initramfs", False, f"the default entry boots {version} without an initramfs")
            )
        elif options.regenerate:
            tool = _update_tool(facts, version)
            checks.append(
                Check(
                    "initramfs-tool",
                    tool is not None,
                    " ".join(tool)
                    if tool
                    else "the guest has no update-initramfs, dracut or mkinitrd: give --initramfs FILE",
                )
            )
            if tool:
                boot.append(RunCommand(tool, "make the initramfs with the edited module lists"))
        else:
            checks.extend(
                check_initramfs(initrd_files or [], initrd_texts or {}, version, required, link_name)
            )
            if options.supplied:
                boot.append(Upload(options.supplied, initrd_path))
    # Boot code.
    disk = _whole(facts.mountpoints.get("/boot") or facts.mountpoints.get("/", "/dev/sda"))
    info["boot_disk"] = disk
    info["write_boot_code"] = False
    # pygrub / PV-GRUB never ran the MBR: it may hold nothing, or parted's generic code that chains to
    # an active partition with no boot sector. Only the guest's own loader there boots its config.
    own = LOADER_CODE.get(loader)
    found = facts.boot_code
    what = "no boot code" if found is None else f"{found} boot code, not {loader}'s,"
    if found is None or (own is not None and found != own and inv.partitioned(disk)):
        if not inv.partitioned(disk):
            root_spec = (
                r.resolve(root_line[0])[0]
                if root_line and r.needs(root_line[0])
                else (root_line[0] if root_line else "?")
            )
            way = (
                f"boot it from outside the disk: libvirt <kernel>/boot/vmlinuz-{version}</kernel> "
                f"<initrd>{initrd_path or '/boot/initrd.img-' + version}</initrd> <cmdline>root={root_spec} ro "
                f"console=tty0 console=ttyS0,115200</cmdline> (copied out of the guest), or qemu -kernel vmlinuz-{version} "
                f"-initrd {posixpath.basename(initrd_path or 'initrd.img-' + version)} -append 'root={root_spec} ro console=ttyS0,115200'; "
                "--force to retarget the files anyway"
            )
            checks.append(
                Check(
                    "boot-code",
                    False,
                    f"{disk} has no partition table and no boot code: it cannot boot from the disk on KVM; "
                    + way,
                    "warning",
                    refuses_as=BootloaderError,
                )
            )
        elif loader == "grub2" and facts.has_tool("grub-install"):
            grub_install = facts.has_tool("grub-install")
            assert grub_install is not None
            # Inside the appliance's chroot the kernel's own names apply, and the kernel does not always
            # name the guest's disk sda (the appliance's disk is scanned beside it): grub-install
            # /dev/sda then hit the appliance's disk ("ext2 doesn't support embedding ... cross-disk
            # install"). So the disk is the one holding /boot (or /) as the chroot's /proc/mounts says,
            # with a device.map for it, tried again on failure.
            script = (
                boot_disk_sh() + "printf '(hd0) %s\\n' \"$d\" > /boot/grub/device.map; "
                f'{grub_install} --target=i386-pc "$d"; rc=$?; rm -f /boot/grub/device.map; exit $rc'
            )
            code.append(
                RunCommand(("/bin/sh", "-c", script), f"{what} in the MBR: the guest's own GRUB", attempts=3)
            )
            info["write_boot_code"] = True
            checks.append(Check("boot-code", True, f"{what} on {disk}: grub-install writes GRUB's"))
        elif loader == "extlinux" and inv.mbr_bin:
            ext = facts.has_tool("extlinux") or "extlinux"
            conf = next(
                (p for p in inv.files if p.endswith(("extlinux.conf", "syslinux.cfg"))),
                "/boot/extlinux/extlinux.conf",
            )
            code.append(RunCommand((ext, "--install", posixpath.dirname(conf)), "the extlinux boot sector"))
            # The disk as the chroot's /proc/mounts names it, as for grub-install above: a dd of=/dev/sda
            # inside the appliance wrote the appliance's own disk (found by the extlinux case in
            # tests/rekernel/test_xen_cases.py: verify saw no boot code in the guest's MBR).
            script = boot_disk_sh() + f'dd if={inv.mbr_bin} of="$d" bs=440 count=1 conv=notrunc'
            code.append(RunCommand(("/bin/sh", "-c", script), f"{what} in the MBR: syslinux's mbr.bin"))
            info["write_boot_code"] = True
            checks.append(Check("boot-code", True, f"{what} on {disk}: syslinux's mbr.bin is written"))
        else:
            checks.append(
                Check(
                    "boot-code",
                    False,
                    f"{what} on {disk}, and no way to write {loader}'s here (grub-install for i386-pc, "
                    "or syslinux's mbr.bin, in the guest); --force to go on and boot it another way",
                    "warning",
                    refuses_as=BootloaderError,
                )
            )
    return Retarget(True, checks, edits, boot, required, info, code)


def check_initramfs(
    files: list[str], texts: dict[str, str], version: str, required: list[str], link: str | None
) -> list[Check]:
    """An initramfs made elsewhere, as listed and read on the host: for ``version``, the drivers, no xvd."""
    checks = []
    mine = any(f"lib/modules/{version}/" in f for f in files)
    checks.append(
        Check(
            "initramfs-version",
            mine,
            f"carries modules of {version}"
            if mine
            else f"carries no lib/modules/{version}: made for another kernel",
        )
    )
    missing = [m for m in required if not initramfs_has(files, m)]
    checks.append(
        Check(
            "initramfs-drivers",
            not missing,
            f"lacks {', '.join(missing)}: rebuild it with them, or let the guest regenerate it"
            if missing
            else "carries " + ", ".join(required),
        )
    )
    baked = [p for p, t in texts.items() if "/dev/xvd" in t]
    checks.append(
        Check(
            "initramfs-config",
            not baked,
            f"its baked-in configuration names /dev/xvd ({', '.join(baked)})"
            if baked
            else "no /dev/xvd in its configuration",
        )
    )
    if link and initramfs_has(files, "virtio_net") and any(f.endswith("99-default.link") for f in files):
        there = any(f.endswith(posixpath.basename(link)) for f in files)
        checks.append(
            Check(
                "initramfs-nic",
                there,
                "carries the NIC's .link"
                if there
                else f"loads virtio_net and names it by 99-default.link before {link} can: the NIC would be "
                "renamed; rebuild it with that file, or let the guest regenerate it",
                "warning",
                refuses_as=KernelError,
            )
        )
    return checks


def _update_tool(facts: GuestFacts, version: str) -> tuple[str, ...] | None:
    if t := facts.has_tool("update-initramfs"):
        return (t, "-u", "-k", version)
    tool = initramfs_tool(facts, version)
    return tool


def _whole(dev: str) -> str:
    m = re.match(r"(/dev/[shv]d[a-z]+)\d*$", dev) or re.match(r"(/dev/nvme\d+n\d+)(p\d+)?$", dev)
    return m.group(1) if m else "/dev/sda"


def merge_plan(plan: Plan, rt: Retarget) -> Plan:
    """A kernel swap's plan with the retarget's checks and steps: edits first, boot code last."""
    checks = list(plan.checks)
    if any(k.name == "boot-code" for k in rt.checks):  # the retarget writes it, or refuses with the way out
        checks = [c for c in checks if c.name != "boot-code"]
    return replace(
        plan,
        checks=tuple(checks + rt.checks),
        steps=tuple(rt.edits) + plan.steps + tuple(rt.boot) + tuple(rt.code),
        retarget=rt.info | {"xen": rt.xen, "required": rt.required},
    )


def plan_retarget(
    facts: GuestFacts,
    inv: Inventory,
    loader: str,
    loader_steps: list[Step],
    *,
    disk: str,
    version: str,
    initrd_path: str | None,
    initrd_files: list[str] | None,
    initrd_texts: dict[str, str] | None,
    options: RetargetOptions,
) -> Plan:
    """A retarget-only plan: the guest keeps its kernel ``version`` and is made to boot on KVM.

    Args:
        loader_steps: the loader's own steps to regenerate its configuration (GRUB 2: update-grub),
            run after the edits and the initramfs.
    """
    rt = plan_xen(
        facts,
        inv,
        loader,
        version=version,
        kernel=inv.kernels.get(version),
        initrd_path=initrd_path,
        initrd_files=initrd_files,
        initrd_texts=initrd_texts,
        options=options,
    )
    initramfs = "unchanged"
    if rt.xen:
        initramfs = "supplied" if options.supplied else ("regenerate" if options.regenerate else "checked")
    steps = [*rt.edits, *rt.boot, *(loader_steps if rt.xen else []), *rt.code]
    return Plan(
        disk=disk,
        root=facts.root,
        version=version,
        previous=version,
        loader=loader,
        initramfs=initramfs,
        checks=tuple(rt.checks),
        steps=tuple(steps),
        facts=facts.summary(),
        action="retarget",
        initramfs_modules=tuple(rt.required),
        retarget=rt.info | {"xen": rt.xen, "required": rt.required, "initrd": initrd_path},
    )
