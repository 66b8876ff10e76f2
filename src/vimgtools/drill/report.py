"""What a drill found: ``DrillReport`` (``to_dict()`` is ``--json``) and its short human rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vimgtools.drill.stages import STAGES, Stage

NO_SERIAL = "nothing on the serial console: this guest's console is not on ttyS0"


@dataclass
class DrillReport:
    """One drill. ``booted`` is the yes/no; the rest says how far it got and how long it took.

    ``to_dict()`` has exactly the fields of ``--json``: ``result``, ``kernel``, ``stages``
    (``{name, seconds}``), ``accel``, ``seconds``, ``log`` and, when it failed, ``last_lines``.
    """

    booted: bool
    kernel: str | None
    stages: list[Stage]
    accel: str
    seconds: float
    log: Path
    last_lines: list[str] = field(default_factory=list)
    #: why it failed (None when it booted)
    reason: str | None = None
    #: the first stage not reached (None when it booted)
    failed_stage: str | None = None
    #: the stage that ends the drill: login, expect or agent
    end: str = "login"
    #: things the admin should know (no serial output, the KVM probe's answer, a forced poweroff)
    notes: list[str] = field(default_factory=list)
    #: guest-get-osinfo's answer with --agent
    os_info: dict[str, Any] | None = None
    screenshot: Path | None = None
    firmware_log: Path | None = None
    #: how the guest was stopped: "agent" (guest-shutdown), "acpi" (the power button), "forced" (killed
    #: after the grace period), or "exited" (it stopped by itself)
    stopped: str = ""

    @property
    def result(self) -> str:
        return "booted" if self.booted else "failed"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "result": self.result,
            "kernel": self.kernel,
            "stages": [
                {"name": s.name, "seconds": None if s.seconds is None else round(s.seconds, 2)}
                for s in self.stages
            ],
            "accel": self.accel,
            "seconds": round(self.seconds, 2),
            "log": str(self.log),
        }
        if not self.booted:
            d["last_lines"] = self.last_lines
        return d


def render(report: DrillReport) -> str:
    """The short report a person reads: each stage and its time; on failure why, and the last lines."""
    out = []
    head = "booted" if report.booted else f"did NOT boot: {report.reason}"
    out.append(f"drill: {head} ({report.seconds:.1f} s, {report.accel})")
    reached = {s.name: s for s in report.stages}
    for name in (*STAGES, report.end):
        s = reached.get(name)
        if s is None:
            mark = "FAILED HERE" if name == report.failed_stage else "-"
            out.append(f"  {name:<11} {'':>8}  {mark}")
            continue
        when = "    ?   " if s.seconds is None else f"{s.seconds:7.1f}s"
        detail = s.detail
        if name == "kernel" and report.kernel and report.kernel not in detail:
            detail = f"{report.kernel} ({detail})" if detail else report.kernel
        out.append(f"  {name:<11} {when}  {detail}")
    if not report.booted and report.failed_stage:
        out.append(f"last stage reached: {_last(report) or 'none'}")
    for note in report.notes:
        out.append(f"note: {note}")
    if report.screenshot:
        out.append(f"screen: {report.screenshot}")
    out.append(f"serial log: {report.log}")
    if not report.booted and report.last_lines:
        out.append(f"last {len(report.last_lines)} serial lines:")
        out += [f"  | {line}" for line in report.last_lines]
    return "\n".join(out)


def _last(report: DrillReport) -> str | None:
    return report.stages[-1].name if report.stages else None
