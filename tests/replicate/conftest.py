"""Fixtures of the replicate tests: the sync tests' helpers (real images, the CLI in a subprocess)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "sync"))
