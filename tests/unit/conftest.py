"""Unit tests: no root, no libguestfs appliance, no network; each runs in well under a second.

Hypothesis keeps its example database under .cache/ (ignored by git). Set
HYPOTHESIS_PROFILE=thorough for a longer search than the everyday run.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_DB = DirectoryBasedExampleDatabase(Path(__file__).resolve().parents[2] / ".cache" / "hypothesis")
# Buffers of up to a few MiB are built per example: slow by hypothesis's standards, fine here.
for _name, _examples in (("default", 60), ("thorough", 1000)):
    settings.register_profile(
        _name,
        max_examples=_examples,
        database=_DB,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
