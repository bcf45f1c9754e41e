"""A peer's event log: one JSON object per line in DATA_DIR/events.jsonl, for scripts and tests."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to the data dir's log; with ``echo``, also prints each line on stdout (--progress json)."""

    def __init__(self, data_dir: Path, echo: bool = False):
        self._file = open(Path(data_dir) / EVENTS_FILE, "a", buffering=1)
        self._echo = echo

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields})
        self._file.write(line + "\n")
        if self._echo:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self._file.close()


def read_events(data_dir: Path) -> list[dict]:
    path = Path(data_dir) / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
