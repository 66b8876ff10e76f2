"""GRUB legacy (0.97): a ``title`` for the new kernel in menu.lst, made ``default``, the old one the fallback.

References: GRUB legacy manual, "Configuration" (title, root, kernel, initrd, default, fallback).
menu.lst is read at boot by stage2, so editing it is the whole restamp. Debian's update-grub for
GRUB legacy would rewrite the file between its AUTOMAGIC markers; we edit the text ourselves so
that the result is the same whichever tools the guest has.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vimgtools.boot.base import BootEntry, Bootloader, guest_path
from vimgtools.errors import BootloaderError
from vimgtools.guest.steps import Step, Write

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts
    from vimgtools.guest.protocol import Guest

CONF_PATHS = ("/boot/grub/menu.lst", "/boot/grub/grub.conf")


@dataclass(frozen=True)
class Title:
    title: str
    start: int
    end: int
    kernel: str | None
    initrd: str | None


def parse_menu(text: str) -> tuple[int, list[Title]]:
    """(default index, entries) of a menu.lst."""
    lines = text.splitlines()
    default = 0
    titles: list[Title] = []
    cur: dict[str, str | None] | None = None
    start = 0
    for i, line in enumerate([*lines, "title __end__"]):
        s = line.strip()
        m = re.match(r"(\w+)[\s=]+(.*)$", s)
        key, rest = (m.group(1).lower(), m.group(2).strip()) if m else (s.lower(), "")
        if key == "title":
            if cur is not None:
                titles.append(Title(cur["title"] or "", start, i, cur["kernel"], cur["initrd"]))
            cur = {"title": rest, "kernel": None, "initrd": None}
            start = i
        elif cur is None and key == "default" and rest.split()[0:1] and rest.split()[0].isdigit():
            default = int(rest.split()[0])
        elif cur is not None and key == "kernel":
            cur["kernel"] = rest.split()[0] if rest else None
        elif cur is not None and key == "initrd":
            cur["initrd"] = rest.split()[0] if rest else None
    # drop trailing blank lines from each block's end
    return default, titles


def add_title(text: str, version: str, *, initrd: bool = True) -> str:
    """Copy the default entry for ``version``, put it first, ``default 0`` and ``fallback 1``."""
    default, titles = parse_menu(text)
    lines = text.splitlines()
    for t in reversed(titles):
        if t.kernel and posixpath.basename(t.kernel) == f"vmlinuz-{version}":
            del lines[t.start : t.end]
    default, titles = parse_menu("\n".join(lines) + "\n")
    if not titles:
        raise BootloaderError("menu.lst: no title entry to copy the new one from")
    base = titles[default] if default < len(titles) else titles[0]
    if not base.kernel:
        raise BootloaderError(f"menu.lst: entry {base.title!r} has no kernel line")
    kdir = posixpath.dirname(base.kernel)
    block: list[str] = []
    for line in lines[base.start : base.end]:
        s = line.strip()
        key = s.split(None, 1)[0].lower() if s else ""
        indent = line[: len(line) - len(line.lstrip())]
        if key == "title":
            block.append(f"title {re.sub(r',? ?kernel .*$', '', s[6:].strip())}, kernel {version}")
        elif key == "kernel":
            args = s.split(None, 2)
            block.append(
                f"{indent}kernel {posixpath.join(kdir, f'vmlinuz-{version}')}"
                + (f" {args[2]}" if len(args) > 2 else "")
            )
        elif key == "initrd":
            if initrd:
                idir = posixpath.dirname(s.split()[1]) if len(s.split()) > 1 else kdir
                block.append(f"{indent}initrd {posixpath.join(idir, f'initrd.img-{version}')}")
        else:
            block.append(line)
    while block and not block[-1].strip():
        block.pop()
    if initrd and base.initrd is None:
        block.append(f"initrd {posixpath.join(kdir, f'initrd.img-{version}')}")
    first = titles[0].start
    head = lines[:first]
    old_default = default
    head = [ln for ln in head if not re.match(r"\s*(default|fallback)\b", ln)]
    head = ["default 0", f"fallback {old_default + 1}", *head]
    return "\n".join([*head, *block, "", *lines[first:]]).rstrip("\n") + "\n"


class GrubLegacy(Bootloader):
    """GRUB 0.97 with menu.lst (old Debian, CentOS 5/6 grub.conf)."""

    name = "grub-legacy"

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        return any(p in facts.files for p in CONF_PATHS)

    @staticmethod
    def conf_path(facts: GuestFacts) -> str:
        return next(p for p in CONF_PATHS if p in facts.files)

    def steps(self, facts: GuestFacts, version: str, initrd: bool) -> list[Step]:
        conf = self.conf_path(facts)
        old = facts.text(conf) or ""
        return [Write(conf, add_title(old, version, initrd=initrd), old)]

    def entries(self, gi: Guest, facts: GuestFacts) -> list[BootEntry]:
        _, titles = parse_menu(gi.text(self.conf_path(facts)) or "")
        return [
            BootEntry(
                t.title, guest_path(facts, t.kernel or ""), t.initrd and guest_path(facts, t.initrd), str(i)
            )
            for i, t in enumerate(titles)
        ]

    def set_default(self, gi: Guest, facts: GuestFacts, version: str) -> None:
        conf = self.conf_path(facts)
        text = gi.text(conf) or ""
        for e in self.entries(gi, facts):
            if posixpath.basename(e.kernel) == f"vmlinuz-{version}":
                new = re.sub(r"^\s*default\s+\S+", f"default {e.ident}", text, count=1, flags=re.M)
                gi.write(conf, new)
                return
        raise self._no_entry(version, conf)

    def default_entry(self, gi: Guest, facts: GuestFacts) -> BootEntry:
        conf = self.conf_path(facts)
        default, _ = parse_menu(gi.text(conf) or "")
        entries = self.entries(gi, facts)
        if default >= len(entries):
            raise BootloaderError(f"{conf}: default {default} but only {len(entries)} entries")
        return entries[default]
