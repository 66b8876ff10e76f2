"""A stand-in for ssh that runs the far side on this host: ``fake_rsh.py HOST COMMAND...``.

Like ssh it drops the host and hands the rest to a shell as one command line, so
quoting bugs show up here exactly as they would over ssh. With FAKE_RSH_PIDFILE set
it writes the far side's process group there (for tests that kill it).
"""

from __future__ import annotations

import os
import subprocess
import sys

host, *words = sys.argv[1:]
if os.environ.get("FAKE_RSH_HOSTLOG"):
    with open(os.environ["FAKE_RSH_HOSTLOG"], "a") as f:
        f.write(host + "\n")
if os.environ.get("FAKE_RSH_PIDFILE"):
    with open(os.environ["FAKE_RSH_PIDFILE"], "w") as f:
        f.write(str(os.getpgrp()))
child = subprocess.Popen(["sh", "-c", " ".join(words)])
sys.exit(child.wait() & 0xFF)
