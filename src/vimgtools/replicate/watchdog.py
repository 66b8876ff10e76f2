"""The freeze watchdog: ``python watchdog.py --agent PATH | --libvirt URI NAME`` (not for use by hand).

Started by ``freeze.frozen`` before it freezes a guest, as a file with the standard library only
(no package import: it must be up in milliseconds, even on a loaded host). Waits on stdin:
"thawed" means vimgtools thawed the guest itself (exit 0); the pipe closing first means vimgtools
died while the guest was frozen: thaw it now, through the agent's socket or ``virsh domfsthaw``
(exit 0 when it did, 1 if it could not).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys

TIMEOUT = 30.0


def thaw_by_agent(path: str) -> str:
    """``guest-fsfreeze-thaw`` on a fresh connection to the agent (ours died with vimgtools)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(json.dumps({"execute": "guest-fsfreeze-thaw"}).encode() + b"\n")
        reply = b""
        while b"\n" not in reply:
            got = s.recv(4096)
            if not got:
                break
            reply += got
    return reply.decode(errors="replace").strip()


def thaw_by_libvirt(uri: str, name: str) -> str:
    p = subprocess.run(
        ["virsh", "-c", uri, "domfsthaw", name], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    return p.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vimgtools.replicate watchdog")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--agent", metavar="PATH", help="the guest agent's socket")
    g.add_argument("--libvirt", nargs=2, metavar=("URI", "NAME"), help="a libvirt domain")
    args = p.parse_args(argv)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # outlive whatever stops vimgtools
    if sys.stdin.readline().strip() == "thawed":
        return 0
    try:
        said = thaw_by_agent(args.agent) if args.agent else thaw_by_libvirt(*args.libvirt)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"vimgtools.replicate: watchdog: cannot thaw the guest: {e}", file=sys.stderr)
        return 1
    print(
        f"vimgtools.replicate: watchdog: vimgtools died with the guest frozen; thawed ({said})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
