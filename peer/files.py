"""Replacing small files atomically, so a reader (another process, or us after kill -9) never sees half."""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path` (created with `mode`), then rename it over `path`.

    durable: fsync before the rename, for files whose loss after a crash would matter (keys, tokens).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    os.replace(tmp, path)
