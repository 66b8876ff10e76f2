"""The replicate CLI run as the tests run it: in a subprocess, with --json, its exit code checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def replicate(
    *args: str | Path, check: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "vimgtools.replicate", "--json", *map(str, args)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert p.returncode == check, p.stderr
    return p


def run_json(*args: str | Path) -> dict[str, Any]:
    """The run's --json object (the run must succeed)."""
    return json.loads(replicate(*args).stdout)  # type: ignore[no-any-return]


def replicate_json(*args: str | Path, check: int = 0) -> tuple[dict[str, Any], str]:
    """(--json object or {} when it printed none, stderr)."""
    p = replicate(*args, check=check)
    return (json.loads(p.stdout) if p.stdout.strip() else {}), p.stderr
