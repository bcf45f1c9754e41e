"""DATA_DIR/peer.pid: which process is training from this data dir, so `peer leave` and `peer status`
can find it, and a second `peer join` on the same identity is refused.

The file records the process's start time too (from /proc), so a recycled PID is never mistaken
for the peer: a stale file (the peer was killed) simply counts as "not running".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from peer.files import replace_file

PID_FILE = "peer.pid"


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def running_peer(data_dir: Path) -> dict | None:
    """The record of the peer process running from data_dir, or None (no file, or a stale one)."""
    try:
        record = json.loads((Path(data_dir) / PID_FILE).read_text())
        pid, ticks = int(record["pid"]), int(record["start_ticks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if _start_ticks(pid) == ticks else None


def write_pidfile(data_dir: Path, **fields) -> None:
    pid = os.getpid()
    record = {"pid": pid, "start_ticks": _start_ticks(pid), "started": time.time(), **fields}
    path = Path(data_dir) / PID_FILE
    replace_file(path, json.dumps(record).encode())


def remove_pidfile(data_dir: Path) -> None:
    path = Path(data_dir) / PID_FILE
    record = running_peer(data_dir)
    if record is None or record["pid"] == os.getpid():
        path.unlink(missing_ok=True)
