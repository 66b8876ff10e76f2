"""Suite-wide settings. Directory conftests hold the fixtures of each part.

``make test`` runs the suite on every core (pytest-xdist, scheduled by ``GROUPS`` below): the boot and
appliance tests are single-threaded TCG, so two of them side by side take the time of one. Tests
that share a daemon (libvirtd), a booted guest or a module fixture stay in one group, on one worker;
the groups that cannot be split are queued first, longest first, so that the last to start are short.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

# Nested KVM hangs on the build machines; users' hosts are not affected.
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")

# (group, the test paths in it) in the order they are queued; a group runs on one worker. Minutes
# from the clean-clone run of 2026-12-01 (2 cores, TCG, empty builder cache, two workers). The
# groups that cannot be split come first, longest first, and the sync tests before them so that
# one worker runs those while the other builds the Debian tree every guest build starts from; the
# rekernel e2e and loader tests run test by test (SPLIT), filling both workers to the end. Builder
# products are shared on disk (flock), so splitting costs nothing but a cache lookup.
GROUPS = [
    ("sync", ("tests/sync/",)),  # ~5
    ("replicate", ("tests/replicate/",)),  # ~20: one libvirtd, one booted guest per worker
    ("drill", ("tests/drill/",)),  # ~15: its replicas are made once per worker
    ("shared", ("tests/rekernel/test_shared.py",)),  # ~14 with its builder
    ("xen-cases", ("tests/rekernel/test_xen_cases.py",)),  # ~9 with its builders: one module fixture
    ("e2e", ("tests/rekernel/test_e2e.py",)),  # ~51 in all, 2-10 a test
    ("xen", ("tests/rekernel/test_xen.py",)),  # ~20: module fixtures (one appliance run for two tests)
    ("loaders", ("tests/rekernel/test_loaders.py",)),
]
SPLIT = ("tests/rekernel/test_e2e.py", "tests/rekernel/test_loaders.py")  # no module fixtures


def group_of(nodeid: str) -> tuple[int, str]:
    for rank, (name, paths) in enumerate(GROUPS):
        if nodeid.startswith(paths):
            return rank, nodeid if nodeid.startswith(SPLIT) else name
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
