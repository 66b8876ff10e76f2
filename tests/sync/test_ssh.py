"""Remote sync through a real sshd on 127.0.0.1 (started here with its own keys and port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from synchelp import MiB, cli, cli_json, digest, poke, write_image

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A private sshd on a loopback port; yields the --rsh/--remote-python arguments that reach it."""
    if os.geteuid() != 0:
        pytest.skip("sshd with our own keys needs root here")
    assert Path(SSHD).exists(), "openssh-server is not installed (make installs it)"
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nAcceptEnv LANG LC_*\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    rsh = (
        f"ssh -p {port} -i {d / 'client_key'} -o BatchMode=yes -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            probe = subprocess.run([*rsh.split(), "127.0.0.1", "true"], capture_output=True)
            if probe.returncode == 0:
                break
            assert proc.poll() is None, f"sshd exited: {proc.stderr.read() if proc.stderr else b''!r}"
            assert time.monotonic() < deadline, f"cannot log in to the test sshd: {probe.stderr!r}"
            time.sleep(0.2)
        yield ["--rsh", rsh, "--remote-python", sys.executable]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


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
