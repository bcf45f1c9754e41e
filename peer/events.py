"""A peer's event log: one JSON object per line in DATA_DIR/events.jsonl, for scripts and tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


class EventLog:
    def __init__(self, data_dir: Path):
        self._file = open(Path(data_dir) / EVENTS_FILE, "a", buffering=1)

    def emit(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_events(data_dir: Path) -> list[dict]:
    path = Path(data_dir) / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
