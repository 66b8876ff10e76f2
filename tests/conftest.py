"""Suite-wide settings. Directory conftests hold the fixtures of each part."""

from __future__ import annotations

import os

# Nested KVM hangs on the build machines; users' hosts are not affected.
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
