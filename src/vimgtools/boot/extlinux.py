"""extlinux/syslinux: a LABEL for the new kernel, made the DEFAULT, the boot sector reinstalled.

References: syslinux.cfg(5) ("LABEL", "KERNEL"/"LINUX", "INITRD", "APPEND", "DEFAULT"; keywords are
case-insensitive; absolute paths are relative to the filesystem extlinux is installed on, relative
ones to the configuration's directory), extlinux(1) (``--install DIR`` rewrites the volume boot record
and ldlinux.sys; the MBR code stays).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vimgtools.boot.base import BootEntry, Bootloader, guest_path
from vimgtools.errors import BootloaderError
from vimgtools.guest.steps import RunCommand, Step, Write

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts
    from vimgtools.guest.protocol import Guest

CONF_PATHS = (
    "/boot/extlinux/extlinux.conf",
    "/boot/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/extlinux.conf",
)
LABEL_PREFIX = "vimg-"


@dataclass(frozen=True)
class Label:
    name: str
    start: int  # line index of LABEL
    end: int  # line index after the block
    kernel: str | None
    initrd: str | None
    append: str | None


def _kw(line: str) -> tuple[str, str]:
    s = line.strip()
    if not s or s.startswith("#"):
        return "", ""
    parts = s.split(None, 1)
    key = parts[0].upper()
    rest = parts[1] if len(parts) > 1 else ""
    if key == "MENU":
        sub = rest.split(None, 1)
        return "MENU " + sub[0].upper(), sub[1] if len(sub) > 1 else ""
    return key, rest


def parse_labels(text: str) -> tuple[str | None, list[Label]]:
    """(DEFAULT label, labels) of an extlinux.conf."""
    lines = text.splitlines()
    default: str | None = None
    labels: list[Label] = []
    cur: dict[str, str | None] | None = None
    start = 0

    def close(end: int) -> None:
        if cur is not None:
            labels.append(Label(cur["name"] or "", start, end, cur["kernel"], cur["initrd"], cur["append"]))

    for i, line in enumerate(lines):
        key, rest = _kw(line)
        if key == "DEFAULT" and cur is None:
            default = rest.strip()
        elif key == "LABEL":
            close(i)
            cur = {"name": rest.strip(), "kernel": None, "initrd": None, "append": None}
            start = i
        elif cur is not None and key in ("KERNEL", "LINUX"):
            cur["kernel"] = rest.strip()
        elif cur is not None and key == "INITRD":
            cur["initrd"] = rest.strip().split(",")[0]
        elif cur is not None and key == "APPEND":
            cur["append"] = rest.strip()
            m = re.search(r"(?:^|\s)initrd=(\S+)", rest)
            if m and not cur["initrd"]:
                cur["initrd"] = m.group(1).split(",")[0]
    close(len(lines))
    return default, labels


def add_label(text: str, version: str, *, initrd: bool = True) -> str:
    """Copy the DEFAULT label for kernel ``version`` as ``vimg-VERSION``, put it first, make it DEFAULT.

    The old entries stay. Running it twice gives the same text.

    Raises:
        BootloaderError: no DEFAULT label to copy from (or no label at all).
    """
    default, labels = parse_labels(text)
    lines = text.splitlines()
    name = LABEL_PREFIX + version
    # Drop an earlier entry of ours for the same version (idempotence).
    for lab in reversed(labels):
        if lab.name == name:
            del lines[lab.start : lab.end]
    default, labels = parse_labels("\n".join(lines) + "\n")
    base = next((lab for lab in labels if lab.name == default), labels[0] if labels else None)
    if base is None or not base.kernel:
        raise BootloaderError("extlinux.conf: no LABEL with a KERNEL to copy the new entry from")
    kdir = posixpath.dirname(base.kernel)
    new_kernel = posixpath.join(kdir, f"vmlinuz-{version}") if kdir else f"vmlinuz-{version}"
    idir = posixpath.dirname(base.initrd) if base.initrd else kdir
    new_initrd = posixpath.join(idir, f"initrd.img-{version}") if idir else f"initrd.img-{version}"
    block: list[str] = []
    for line in lines[base.start : base.end]:
        key, rest = _kw(line)
        indent = line[: len(line) - len(line.lstrip())]
        if key == "LABEL":
            block.append(f"LABEL {name}")
        elif key == "MENU LABEL":
            block.append(f"{indent}MENU LABEL {rest.split(',')[0]}, kernel {version}")
        elif key in ("KERNEL", "LINUX"):
            block.append(f"{indent}{line.split()[0]} {new_kernel}")
        elif key == "INITRD":
            if initrd:
                block.append(f"{indent}{line.split()[0]} {new_initrd}")
        elif key == "APPEND":
            rest2 = re.sub(r"(^|\s)initrd=\S+", rf"\g<1>initrd={new_initrd}", rest) if initrd else rest
            block.append(f"{indent}APPEND {rest2}")
        elif key in ("MENU DEFAULT",):
            continue
        else:
            block.append(line)
    while block and not block[-1].strip():
        block.pop()
    if initrd and base.initrd is None:
        block.insert(2 if len(block) > 1 else 1, f"    INITRD {new_initrd}")
    first = labels[0].start
    out = [*lines[:first], *block, "", *lines[first:]]
    # DEFAULT -> the new label (replace the global one, or add it at the top).
    for i, line in enumerate(out[:first]):
        if _kw(line)[0] == "DEFAULT":
            out[i] = f"DEFAULT {name}"
            break
    else:
        out.insert(0, f"DEFAULT {name}")
    return "\n".join(out).rstrip("\n") + "\n"


def set_default_label(text: str, name: str) -> str:
    _, labels = parse_labels(text)
    if name not in {lab.name for lab in labels}:
        raise BootloaderError(f"extlinux.conf: no LABEL {name}")
    lines = text.splitlines()
    first = labels[0].start if labels else len(lines)
    for i, line in enumerate(lines[:first]):
        if _kw(line)[0] == "DEFAULT":
            lines[i] = f"DEFAULT {name}"
            break
    else:
        lines.insert(0, f"DEFAULT {name}")
    return "\n".join(lines) + "\n"


class Extlinux(Bootloader):
    """extlinux (syslinux for ext2/3/4, btrfs, xfs) on BIOS."""

    name = "extlinux"
    boot_code: ClassVar[str | None] = "syslinux"

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        return any(p in facts.files for p in CONF_PATHS)

    @staticmethod
    def conf_path(facts: GuestFacts) -> str:
        return next(p for p in CONF_PATHS if p in facts.files)

    def refuse_if_unsupported(self, facts: GuestFacts) -> None:
        if not facts.has_tool("extlinux"):
            raise BootloaderError(
                f"{facts.root}: extlinux configuration found but no extlinux tool in the guest to "
                "reinstall the boot sector; install the guest's extlinux package"
            )

    def steps(self, facts: GuestFacts, version: str, initrd: bool) -> list[Step]:
        conf = self.conf_path(facts)
        old = facts.text(conf) or ""
        tool = facts.has_tool("extlinux")
        assert tool is not None
        return [
            Write(conf, add_label(old, version, initrd=initrd), old),
            RunCommand((tool, "--install", posixpath.dirname(conf)), "reinstall the extlinux boot sector"),
        ]

    def _resolve(self, facts: GuestFacts, conf: str, path: str) -> str:
        if path.startswith("/"):
            return guest_path(facts, path)
        return posixpath.normpath(posixpath.join(posixpath.dirname(conf), path))

    def entries(self, gi: Guest, facts: GuestFacts) -> list[BootEntry]:
        conf = self.conf_path(facts)
        _, labels = parse_labels(gi.text(conf) or "")
        return [
            BootEntry(
                lab.name,
                self._resolve(facts, conf, lab.kernel or ""),
                lab.initrd and self._resolve(facts, conf, lab.initrd),
                lab.name,
            )
            for lab in labels
        ]

    def set_default(self, gi: Guest, facts: GuestFacts, version: str) -> None:
        conf = self.conf_path(facts)
        text = gi.text(conf) or ""
        for e in self.entries(gi, facts):
            if e.kernel.rsplit("/", 1)[-1] == f"vmlinuz-{version}":
                gi.write(conf, set_default_label(text, e.ident))
                return
        raise self._no_entry(version, conf)

    def default_entry(self, gi: Guest, facts: GuestFacts) -> BootEntry:
        conf = self.conf_path(facts)
        default, _ = parse_labels(gi.text(conf) or "")
        entries = self.entries(gi, facts)
        for e in entries:
            if e.ident == default:
                return e
        if entries and default is None:
            return entries[0]
        raise BootloaderError(f"{conf}: DEFAULT {default!r} names no LABEL")


__all__ = ["Extlinux", "add_label", "parse_labels", "set_default_label"]
