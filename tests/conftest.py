"""Suite-wide settings. Directory conftests hold the fixtures of each part.

``make test`` runs the suite on every core (pytest-xdist, scheduled by ``GROUPS`` below): the boot and
appliance tests are single-threaded TCG, so two of them side by side take the time of one. Tests
that share a guest build, a daemon (libvirtd) or a booted guest stay in one group, on one worker;
the groups are queued longest first so the last one to start is a short one.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# Nested KVM hangs on the build machines; users' hosts are not affected.
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")

# (group, the test paths in it), longest first (minutes on a 2-core TCG machine, empty builder
# cache, two workers: the clean-clone run of 2026-12-01). The sync tests come second so that one
# worker runs them while the other builds the Debian tree every guest build starts from. Builder
# products are shared on disk (flock): a group per file costs nothing but a cache lookup.
GROUPS = [
    ("e2e", ("tests/rekernel/test_e2e.py",)),  # ~45
    ("sync", ("tests/sync/",)),  # ~5
    ("xen", ("tests/rekernel/test_xen.py",)),  # ~20 with its builds
    ("replicate", ("tests/replicate/",)),  # ~20: one libvirtd, one booted guest per worker
    ("drill", ("tests/drill/",)),  # ~15
    ("xen-cases", ("tests/rekernel/test_xen_cases.py",)),  # ~8 with its builds
    ("loaders", ("tests/rekernel/test_loaders.py",)),
    ("shared", ("tests/rekernel/test_shared.py",)),  # ~7
]


def group_of(nodeid: str) -> tuple[int, str]:
    for rank, (name, paths) in enumerate(GROUPS):
        if nodeid.startswith(paths):
            return rank, name
    return len(GROUPS), nodeid.split("::")[0]  # the rest: a file per group


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: group_of(item.nodeid)[0])  # stable: a file's own order is kept


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's: our groups are its scheduling units
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    # Not xdist_group marks: pytest 9 keeps node ids where xdist 3.8's loadgroup cannot suffix them.
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)[1]

    return GroupScheduling(config, log)
