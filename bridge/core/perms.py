"""File permissions: what the bridge writes is its own user's alone.

The data directory holds webhook secrets, hashed API keys, transcripts and
recordings. Every ``trunkline`` process sets ``umask 077`` first thing (files
0600, directories 0700), and at start ``tighten`` takes group/other access
away from a data directory made by an older version (or by hand).
"""
from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("trunkline")

UMASK = 0o077


def secure_umask() -> int:
    """Set the process umask to 077; returns the previous one."""
    return os.umask(UMASK)


def tighten(path: str, max_entries: int = 200000) -> int:
    """Remove group/other permission bits under ``path`` (itself included; symlinks are not
    followed). Returns how many entries were changed; errors are logged, never raised."""
    changed = 0
    if not os.path.isdir(path):
        return 0

    def fix(p: str) -> None:
        nonlocal changed
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
                return
            os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)
            changed += 1
        except OSError as exc:
            log.warning("cannot restrict permissions of %s: %s", p, exc.strerror)

    seen = 0
    fix(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            fix(os.path.join(root, name))
            seen += 1
            if seen >= max_entries:
                return changed
    return changed
