"""Small /proc look-ups shared by the cgroup and Docker helpers."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the ")" that closes the command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def pids_mentioning(needle: str) -> list[int]:
    """Processes (other than this one) with ``needle`` in some argument."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            if any(needle in arg for arg in cmdline(int(entry.name))):
                found.append(int(entry.name))
    return found


def pids_named(name: str) -> list[int]:
    """Processes whose argv[0] has basename ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if args and Path(args[0]).name == name:
                found.append(int(entry.name))
    return found
