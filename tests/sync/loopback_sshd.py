"""A private sshd on a loopback port with its own keys: for the ssh tests and the remote benchmark."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_sshd(workdir: Path) -> Iterator[str]:
    """Start sshd on 127.0.0.1; yields the ssh command line (an --rsh value) that logs in to it."""
    if os.geteuid() != 0:
        raise PermissionError("an sshd with its own keys needs root here")
    if not Path(SSHD).exists():
        raise FileNotFoundError(f"{SSHD}: openssh-server is not installed (make installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        key = workdir / name
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host_key'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPidFile {workdir / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    rsh = (
        f"ssh -p {port} -i {workdir / 'client_key'} -o BatchMode=yes -o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    )
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([*rsh.split(), "127.0.0.1", "true"], capture_output=True).returncode != 0:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {proc.stderr.read() if proc.stderr else b''!r}")
            if time.monotonic() > deadline:
                raise RuntimeError("cannot log in to the test sshd")
            time.sleep(0.2)
        yield rsh
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
