"""Remote sync through a real sshd on 127.0.0.1 (started here with its own keys and port)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_sshd import loopback_sshd
from synchelp import MiB, cli, cli_json, digest, poke, write_image


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A private sshd on a loopback port; yields the --rsh/--remote-python arguments that reach it."""
    if os.geteuid() != 0:
        pytest.skip("sshd with our own keys needs root here")
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as rsh:
        yield ["--rsh", rsh, "--remote-python", sys.executable]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    src = write_image(tmp_path / "src.img", 40 * MiB, [(0, 16 * MiB), (30 * MiB, 2 * MiB)], seed=51)
    dst = tmp_path / "dst.img"
    cli(src, dst)
    poke(src, 5 * 4096, os.urandom(4096))
    poke(src, 31 * MiB, os.urandom(3 * 4096))
    return src, dst


def test_push_over_ssh(sshd: list[str], pair: tuple[Path, Path]) -> None:
    src, dst = pair
    r = cli_json(*sshd, src, f"root@127.0.0.1:{dst}")
    assert digest(src) == digest(dst)
    assert r["changed"] == 4 and r["bytes_written"] == 4 * 4096
    assert r["bytes_sent"] < 4 * 4096 + 32 * 1024  # the changed pages and a little framing


def test_pull_over_ssh(sshd: list[str], pair: tuple[Path, Path]) -> None:
    src, dst = pair
    r = cli_json(*sshd, f"127.0.0.1:{src}", dst)
    assert digest(src) == digest(dst) and r["changed"] == 4


def test_odd_names_over_ssh(sshd: list[str], tmp_path: Path) -> None:
    odd = tmp_path / "a dir; touch OOPS" / "disk 'of' \"mail\" $(id).img"
    odd.parent.mkdir()
    write_image(odd, 8 * MiB, [(0, MiB)], seed=52)
    dst = tmp_path / "copy $HOME; rm -rf x.img"
    cli(*sshd, odd, f"127.0.0.1:{dst}")
    assert digest(odd) == digest(dst)
    back = tmp_path / "back.img"
    cli(*sshd, f"127.0.0.1:{dst}", back)
    assert digest(back) == digest(odd)
    assert not list(Path.cwd().glob("OOPS")) and not list(tmp_path.glob("OOPS"))


def test_unknown_host_is_a_clean_error(sshd: list[str], pair: tuple[Path, Path]) -> None:
    src, _ = pair
    rsh = sshd[1].replace("-o BatchMode=yes", "-o BatchMode=yes -o ConnectTimeout=5")
    p = cli("--rsh", rsh, src, "no-such-host.invalid:/x.img", check=1)
    assert "no-such-host.invalid" in p.stderr and "Traceback" not in p.stderr
    assert shutil.which("ssh")


def test_qcow2_on_both_ends_over_ssh(sshd: list[str], tmp_path: Path) -> None:
    """A qcow2 with a backing file pushed into a qcow2 replica the far side creates, then pulled back."""
    import subprocess

    def qemu(*args: str | Path) -> None:
        subprocess.run([*map(str, args)], check=True, capture_output=True)

    base, src = tmp_path / "base.qcow2", tmp_path / "mail.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, 32 * MiB)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 2M", base)
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", src)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5b 1M 4k", src)
    dst = tmp_path / "dr" / "mail.qcow2"
    dst.parent.mkdir()
    r = cli_json(*sshd, "--verify", src, f"127.0.0.1:{dst}")
    assert r["src_format"] == "qcow2" and r["dst_format"] == "qcow2" and r["verified"] is True
    assert len(r["src_chain"]) == 2  # type: ignore[arg-type]
    qemu("qemu-img", "compare", "-q", src, dst)
    back = tmp_path / "back.img"
    r = cli_json(*sshd, f"127.0.0.1:{dst}", back)
    assert r["src_format"] == "qcow2" and r["dst_format"] == "raw"
    qemu("qemu-img", "compare", "-q", src, back)
