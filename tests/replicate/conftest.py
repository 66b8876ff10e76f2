"""Fixtures of the replicate tests: the sync tests' helpers (real images, the CLI in a subprocess), and
the real parts of guests.py: libvirtd started by the tests, a running test guest that writes (through
libvirt, or qemu with QMP), and directories libvirt's QEMU can reach.

Boots cost 60-100 s under TCG: ``libvirt_guest`` is one guest for the whole session (its disks are
copies, the domain ``vimg-test-PID-guest``); a test may shut it down, destroy or kill it, and the next
test asking for ``libvirt_guest`` gets it running again. On a failed test, the console tails of the
guests it used are added to the report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "sync"))
sys.path.insert(0, str(Path(__file__).parent))

import guests

URI = "qemu:///system"
GUEST_NAME = guests.DOMAIN_PREFIX + "guest"
HERE = Path(__file__).parent
#: The session guests booted so far: stopped after the last test of this directory (a TCG guest and
#: its workload would slow every test after it), undefined at the end of the session.
_BOOTED: list[guests.Guest] = []


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "the replicate guest tests need root (libvirtd, loop mounts, guests built with debootstrap)"
        )


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A private sshd on a loopback port (the DR host, as the sync tests have it): the --rsh and
    --remote-python arguments that reach it as root@127.0.0.1."""
    from loopback_sshd import loopback_sshd

    _needs_root()
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as rsh:
        yield ["--rsh", rsh, "--remote-python", sys.executable]


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """libvirtd (and virtlogd) answering on qemu:///system: the URI. Started here unless already
    running; at the end this session's domains (``guests.DOMAIN_PREFIX``: ``vimg-test-PID-``, and
    those of sessions that are gone) are destroyed and undefined, and the daemons this fixture
    started are stopped by PID (unless other sessions' domains run on them)."""
    _needs_root()
    daemons = guests.start_libvirtd(URI)
    print(f"\nlibvirtd: {'started' if daemons.started else 'already running'} in {daemons.seconds:.1f} s")
    try:
        yield URI
    finally:
        guests.remove_test_domains(URI)
        guests.sweep_test_dirs()
        if left := guests.stop_daemons(daemons):
            print(f"\nlibvirtd: left running for the domains of other sessions: {', '.join(left)}")


@pytest.fixture(scope="session")
def guest_disks() -> tuple[Path, Path]:
    """The cached pair (vda.qcow2, vdb.qcow2): read-only, copy them (``guests.copy_disks``)."""
    _needs_root()
    return guests.build_disks()


@pytest.fixture
def libvirt_tmp() -> Iterator[Path]:
    """A fresh directory libvirt's QEMU can reach (under /var/lib/libvirt/images), removed after."""
    _needs_root()
    d = guests.libvirt_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_session_guest(libvirtd: str, guest_disks: tuple[Path, Path]) -> Iterator[guests.LibvirtGuest]:
    """The session's libvirt guest, booted once, agent answering (use ``libvirt_guest``)."""
    d = guests.libvirt_dir()
    disks = guests.copy_disks(d)
    g = guests.start_libvirt_guest(libvirtd, GUEST_NAME, disks, d / "console.log")
    _BOOTED.append(g)
    try:
        seconds = g.wait_agent(420)
        print(f"\n{GUEST_NAME}: agent answered {seconds:.0f} s after the start")
        yield g
    finally:
        _BOOTED.remove(g)
        g.undefine()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def libvirt_guest(libvirt_session_guest: guests.LibvirtGuest) -> guests.LibvirtGuest:
    """The session's libvirt guest, running and its agent answering (started again if a test before
    stopped it). Its disks: ``.disks``; its domain: ``.dom``; its console: ``.console``."""
    g = libvirt_session_guest
    if not g.is_running():
        g.start()
    g.wait_agent(420)
    return g


@pytest.fixture(scope="session")
def qmp_session_guest(
    tmp_path_factory: pytest.TempPathFactory, guest_disks: tuple[Path, Path]
) -> Iterator[guests.QmpGuest]:
    """The test guest in qemu without libvirt, booted once a session (only if a test asks)."""
    work = tmp_path_factory.mktemp("qmp-guest")
    disks = guests.copy_disks(work / "disks")
    g = guests.start_qmp_guest(disks, work)
    _BOOTED.append(g)
    try:
        seconds = g.wait_agent(420)
        print(f"\nqmp guest: agent answered {seconds:.0f} s after the start")
        yield g
    finally:
        _BOOTED.remove(g)
        g.stop()


@pytest.fixture
def qmp_guest(qmp_session_guest: guests.QmpGuest) -> guests.QmpGuest:
    """The QMP guest, running (a test that stopped or killed it makes the next one fail: restart it
    with ``guests.start_qmp_guest(g.disks, workdir)`` if you need that)."""
    assert qmp_session_guest.is_running(), qmp_session_guest.console_tail()
    return qmp_session_guest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shuts_down_guest: shuts the session's libvirt guest down; run after the other tests of "
        "tests/replicate, so that they need no second boot",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``shuts_down_guest`` move behind the other tests of this directory."""
    here = [i for i, item in enumerate(items) if Path(item.path).parent == HERE]
    late = [items[i] for i in here if items[i].get_closest_marker("shuts_down_guest")]
    if not late or len(late) == len(here):
        return
    last = max(i for i in here if not items[i].get_closest_marker("shuts_down_guest"))
    anchor = items[last]
    for item in late:
        items.remove(item)
    at = items.index(anchor) + 1
    items[at:at] = late


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of this directory: stop the session guests (their CPU is for the rest)."""
    if Path(item.path).parent == HERE and (nextitem is None or Path(nextitem.path).parent != HERE):
        for g in _BOOTED:
            with contextlib.suppress(Exception):
                if isinstance(g, guests.LibvirtGuest):
                    g.destroy(sigkill=False)
                elif isinstance(g, guests.QmpGuest):
                    g.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """On failure, the console tails of the guests the test used, in the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        for name in ("libvirt_guest", "libvirt_session_guest", "qmp_guest", "qmp_session_guest"):
            g = funcargs.get(name)
            if isinstance(g, guests.Guest):
                with contextlib.suppress(Exception):
                    report.sections.append((f"console of {name}", g.console_tail(60)))
