"""python -m vimgtools.replicate.watchdog --agent PATH | --libvirt URI NAME

Started by ``freeze.frozen`` before it freezes a guest; not for use by hand. Waits on stdin:
"thawed" means vimgtools thawed the guest itself (exit 0); the pipe closing first means
vimgtools died while the guest was frozen: thaw it now (exit 0 when it did, 1 if it could not).
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vimgtools.replicate.watchdog")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--agent", metavar="PATH", help="the guest agent's socket")
    g.add_argument("--libvirt", nargs=2, metavar=("URI", "NAME"), help="a libvirt domain")
    args = p.parse_args(argv)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # outlive whatever stops vimgtools
    if sys.stdin.readline().strip() == "thawed":
        return 0
    try:
        if args.agent:
            from vimgtools.replicate.qmp import thaw_by_agent

            n = thaw_by_agent(args.agent)
        else:
            from vimgtools.replicate.libvirt import thaw_domain

            n = thaw_domain(*args.libvirt)
    except Exception as e:
        print(f"vimgtools.replicate.watchdog: cannot thaw the guest: {e}", file=sys.stderr)
        return 1
    print(
        f"vimgtools.replicate.watchdog: vimgtools died with the guest frozen: {n} filesystems thawed",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
