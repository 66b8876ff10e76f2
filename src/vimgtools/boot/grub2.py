"""GRUB 2: regenerate grub.cfg with the guest's own grub-mkconfig, and make the new kernel the default.

The default is set as GRUB does it itself: ``GRUB_DEFAULT=saved`` in ``/etc/default/grub`` and
``saved_entry=SUBMENU_ID>ENTRY_ID`` in ``grubenv`` (grub-editenv), so it holds whatever the version
order (update-grub makes the highest version the first entry, which may be the old kernel). The
boot code in sector 0 and core.img stay: update-grub alone is enough when GRUB 2 already boots the
disk. References: GRUB manual "Simple configuration" (GRUB_DEFAULT, saved_entry), grub-editenv(1),
the environment block format (1024 bytes, "# GRUB Environment Block", '#' padding).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vimgtools.boot.base import BootEntry, Bootloader, guest_path
from vimgtools.errors import BootloaderError
from vimgtools.guest.steps import RunCommand, SetDefault, Step, Write

if TYPE_CHECKING:
    from vimgtools.guest.facts import GuestFacts
    from vimgtools.guest.protocol import Guest

GRUBENV_SIZE = 1024
GRUBENV_HEADER = "# GRUB Environment Block\n"
CFG_PATHS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")


@dataclass(frozen=True)
class GrubEntry:
    title: str
    ident: str  # $menuentry_id_option, or "" when the entry has none
    path: tuple[str, ...]  # ids (or titles) of the enclosing submenus, outermost first
    index: int  # position among its siblings
    kernel: str | None
    initrd: str | None
    top_index: int  # index of its top-level item (itself, or its outermost submenu)

    @property
    def selector(self) -> str:
        """What ``saved_entry`` / ``GRUB_DEFAULT`` takes to select this entry."""
        return ">".join((*self.path, self.ident or self.title))

    @property
    def recovery(self) -> bool:
        return "recovery" in self.title.lower()


_OPEN = re.compile(r"""^\s*(menuentry|submenu)\s+(?:'([^']*)'|"([^"]*)"|(\S+))(.*)\{\s*$""")
_ID = re.compile(r"""\$menuentry_id_option\s+(?:'([^']*)'|"([^"]*)"|(\S+))""")


def parse_grub_cfg(text: str) -> list[GrubEntry]:
    """The menu entries of a grub.cfg, nested in their submenus, with their linux/initrd paths."""
    entries: list[GrubEntry] = []
    stack: list[tuple[str, str]] = []  # (kind, selector part): "submenu", "menuentry", "other"
    counters: list[int] = [0]  # next index among siblings, one counter per submenu level
    cur_top = 0
    current: dict[str, str | None] | None = None
    cur_index = 0
    for raw in text.splitlines():
        line = raw.strip()
        m = _OPEN.match(raw)
        if m:
            kind = m.group(1)
            title = next(g for g in m.group(2, 3, 4) if g is not None)
            idm = _ID.search(m.group(5))
            ident = next((g for g in idm.group(1, 2, 3) if g is not None), "") if idm else ""
            index = counters[-1]
            counters[-1] += 1
            if not any(k in ("submenu", "menuentry") for k, _ in stack):
                cur_top = index
            if kind == "submenu":
                stack.append(("submenu", ident or title))
                counters.append(0)
            else:
                stack.append(("menuentry", ident))
                current = {"title": title, "ident": ident, "kernel": None, "initrd": None}
                cur_index = index
            continue
        if re.match(r"^\s*function\s+\S+\s*\{\s*$", raw):
            stack.append(("other", ""))
            continue
        if line == "}":
            if not stack:
                continue
            kind, _ = stack.pop()
            if kind == "submenu":
                counters.pop()
            elif kind == "menuentry" and current is not None:
                path = tuple(sel for k, sel in stack if k == "submenu")
                entries.append(
                    GrubEntry(
                        title=current["title"] or "",
                        ident=current["ident"] or "",
                        path=path,
                        index=cur_index,
                        kernel=current["kernel"],
                        initrd=current["initrd"],
                        top_index=cur_top,
                    )
                )
                current = None
            continue
        if current is not None and line:
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                words = line.split()
            if words and words[0] in ("linux", "linux16", "linuxefi") and len(words) > 1:
                current["kernel"] = words[1]
            elif words and words[0] in ("initrd", "initrd16", "initrdefi") and len(words) > 1:
                current["initrd"] = words[1]
    return entries


def entry_for(entries: list[GrubEntry], version: str) -> GrubEntry | None:
    """The normal (not recovery) entry booting ``vmlinuz-VERSION``; a specific one (in a submenu) first."""
    want = f"vmlinuz-{version}"
    found = [e for e in entries if e.kernel and e.kernel.rsplit("/", 1)[-1] == want and not e.recovery]
    found.sort(key=lambda e: (not e.path, e.top_index, e.index))
    return found[0] if found else None


def select(entries: list[GrubEntry], default: str) -> GrubEntry | None:
    """Resolve a GRUB ``default`` value (index, id, title, ``a>b`` path) to an entry."""
    parts = default.split(">") if default else ["0"]
    # A path: each part selects among the children of the previous one (by index, id or title).
    level: tuple[str, ...] = ()
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if last:
            for e in entries:
                if e.path == level and (
                    e.ident == part or e.title == part or (part.isdigit() and e.index == int(part))
                ):
                    return e
            # The index may point at a submenu: GRUB then boots nothing useful; report it as no entry.
            return None
        # find the submenu selector at this level
        subs = {
            e.path[len(level)] for e in entries if len(e.path) > len(level) and e.path[: len(level)] == level
        }
        if part in subs:
            level = (*level, part)
        elif part.isdigit():
            # an index at this level that is a submenu: the n-th top-level item
            cands = sorted({(e.top_index, e.path[len(level)]) for e in entries if len(e.path) > len(level)})
            match = [sel for idx, sel in cands if idx == int(part)]
            if not match:
                return None
            level = (*level, match[0])
        else:
            return None
    return None


def set_shell_var(text: str, name: str, value: str) -> str:
    """Set ``NAME=value`` in a shell-style file such as /etc/default/grub (replace or append)."""
    line = f"{name}={value}"
    pattern = re.compile(rf"^(\s*){re.escape(name)}=.*$", re.M)
    if pattern.search(text):
        return pattern.sub(lambda m: m.group(1) + line, text, count=1)
    sep = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{sep}{line}\n"


def get_shell_var(text: str, name: str) -> str | None:
    found = list(re.finditer(rf"^\s*{re.escape(name)}=(.*)$", text, re.M))
    if not found:
        return None
    m = found[-1]
    if m is None:
        return None
    v = m.group(1).strip()
    try:
        words = shlex.split(v, comments=True)
    except ValueError:
        return v
    return words[0] if words else ""


def parse_grubenv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out[k] = v
    return out


def make_grubenv(env: dict[str, str]) -> str:
    """A 1024-byte GRUB environment block (the format grub-editenv writes)."""
    body = GRUBENV_HEADER + "".join(f"{k}={v}\n" for k, v in env.items())
    if len(body) > GRUBENV_SIZE:
        raise BootloaderError("grubenv: the environment does not fit in 1024 bytes")
    return body + "#" * (GRUBENV_SIZE - len(body))


def cfg_default(cfg: str, env: dict[str, str]) -> str:
    """The default GRUB computes from grub.cfg's ``set default=`` and grubenv's saved_entry."""
    values = re.findall(r"""^\s*set default=["']?([^"'\n]*)["']?\s*$""", cfg, re.M)
    if env.get("next_entry") and any("next_entry" in v for v in values):
        return env["next_entry"]  # a one-time grub-reboot choice wins
    if any("saved_entry" in v for v in values):
        return env.get("saved_entry", "") or "0"
    literal = [v for v in values if "$" not in v]
    return literal[0] if literal else "0"


class Grub2(Bootloader):
    """GRUB 2 (i386-pc or EFI) with grub-mkconfig-made configuration."""

    name = "grub2"
    boot_code: ClassVar[str | None] = "grub"

    @classmethod
    def detect(cls, facts: GuestFacts) -> bool:
        return (
            any(p in facts.files for p in CFG_PATHS)
            and facts.has_tool("update-grub", "grub-mkconfig", "grub2-mkconfig") is not None
        )

    @staticmethod
    def cfg_path(facts: GuestFacts) -> str:
        return next(p for p in CFG_PATHS if p in facts.files)

    def refuse_if_unsupported(self, facts: GuestFacts) -> None:
        conf = facts.text("/etc/default/grub") or ""
        if (get_shell_var(conf, "GRUB_ENABLE_BLSCFG") or "").lower() == "true":
            raise BootloaderError(
                f"{facts.root}: GRUB 2 with BLS entries (GRUB_ENABLE_BLSCFG=true, /boot/loader/entries) "
                "is not supported yet; add a BLS entry with the guest's kernel-install instead"
            )

    def steps(self, facts: GuestFacts, version: str, initrd: bool) -> list[Step]:
        cfg = self.cfg_path(facts)
        steps: list[Step] = []
        old = facts.text("/etc/default/grub")
        if old is not None:
            new = set_shell_var(old, "GRUB_DEFAULT", "saved")
            if new != old:
                steps.append(Write("/etc/default/grub", new, old))
        else:
            steps.append(Write("/etc/default/grub", "GRUB_DEFAULT=saved\n", None))
        tool = facts.has_tool("update-grub")
        if tool and cfg == "/boot/grub/grub.cfg":
            steps.append(RunCommand((tool,), "regenerate grub.cfg with the guest's own tool"))
        else:
            mk = facts.has_tool("grub-mkconfig", "grub2-mkconfig")
            assert mk is not None
            steps.append(RunCommand((mk, "-o", cfg), "regenerate grub.cfg with the guest's own tool"))
        steps.append(SetDefault(self.name, version))
        return steps

    def entries(self, gi: Guest, facts: GuestFacts) -> list[BootEntry]:
        cfg = gi.text(self.cfg_path(facts)) or ""
        return [
            BootEntry(
                e.title,
                guest_path(facts, e.kernel or ""),
                e.initrd and guest_path(facts, e.initrd),
                e.selector,
            )
            for e in parse_grub_cfg(cfg)
        ]

    def set_default(self, gi: Guest, facts: GuestFacts, version: str) -> None:
        cfg_file = self.cfg_path(facts)
        cfg = gi.text(cfg_file) or ""
        entry = entry_for(parse_grub_cfg(cfg), version)
        if entry is None:
            raise self._no_entry(version, cfg_file)
        envfile = cfg_file.rsplit("/", 1)[0] + "/grubenv"
        editenv = facts.has_tool("grub-editenv", "grub2-editenv")
        if editenv:
            gi.run([editenv, envfile, "set", f"saved_entry={entry.selector}"])
        else:
            env = parse_grubenv(gi.text(envfile) or "")
            env["saved_entry"] = entry.selector
            gi.write(envfile, make_grubenv(env))

    def default_entry(self, gi: Guest, facts: GuestFacts) -> BootEntry:
        cfg_file = self.cfg_path(facts)
        cfg = gi.text(cfg_file) or ""
        env = parse_grubenv(gi.text(cfg_file.rsplit("/", 1)[0] + "/grubenv") or "")
        default = cfg_default(cfg, env)
        e = select(parse_grub_cfg(cfg), default)
        if e is None or not e.kernel:
            raise BootloaderError(f"{cfg_file}: the default {default!r} selects no entry with a kernel")
        return BootEntry(
            e.title, guest_path(facts, e.kernel), e.initrd and guest_path(facts, e.initrd), e.selector
        )
