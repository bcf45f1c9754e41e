"""The peer's main process picks up its averagers' attestation records and sends them with its reports.

The averager processes append one JSON line per record to ``<data dir>/attestations.jsonl`` (the
contract in the project notes: one ``write()`` per whole line). The report path reads the lines
after a byte offset that the outbox stores in the same transaction as the report carrying them, so
a record is sent exactly once even across a crash, and a line still being written (no newline yet)
is left for the next report. Records beyond the per-report cap wait for the next report too.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from protos import coordinator_pb2 as pb

log = logging.getLogger("potluck.peer")

ATTESTATIONS_FILE = "attestations.jsonl"
# A round makes two records per group member, so a report must carry more than a round's worth or a
# backlog grows: the byte budget is what binds (about 2,000 records of 64-float sketches).
MAX_PER_REPORT = 1024          # the coordinator reads no more than this many records from one report
MAX_REPORT_BYTES = 768 * 1024  # stay well under the 1 MiB message limit (peer/transport.py)
MAX_LINE_BYTES = 64 * 1024     # a longer line is not a record (1024 floats of sketch is ~25 KB)
_READ_BYTES = 4 << 20          # per call; the rest is read by the next report


def to_message(record: dict) -> pb.Attestation:
    """A contract record as the wire message; ValueError when a field is missing or of the wrong kind."""
    try:
        message = pb.Attestation(
            role=str(record["role"]), kind=str(record["kind"]), group=str(record["group"]),
            epoch=int(record["epoch"]), sender=str(record["sender"]), reducer=str(record["reducer"]),
            length=int(record["length"]), sketch=[float(x) for x in record["sketch"]],
            norm_sq=float(record["norm_sq"]), weight=float(record.get("weight", 0.0)),
            score=float(record.get("score", 0.0)), clipped=bool(record.get("clipped", False)),
            time=float(record.get("time", 0.0)),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"not an attestation record: {error}") from None
    numbers = (*message.sketch, message.norm_sq, message.weight, message.score, message.time)
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("not an attestation record: non-finite number")
    return message


def attach_attestations(request: pb.ReportRequest, path: Path, offset: int,
                        max_records: int = MAX_PER_REPORT, max_bytes: int = MAX_REPORT_BYTES) -> int:
    """Append the complete records after ``offset`` of ``path`` to ``request`` (up to the caps);
    return the offset just past the last line consumed. A missing file reads as empty."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            if offset > size:  # the file was replaced (a fresh data dir): start over
                offset = 0
            file.seek(offset)
            data = file.read(_READ_BYTES)
    except FileNotFoundError:
        return 0
    position, size = offset, request.ByteSize()
    while len(request.attestations) < max_records:
        end = data.find(b"\n", position - offset)
        if end < 0:  # a torn last line: its writer has not finished it yet
            break
        line, next_position = data[position - offset:end], offset + end + 1
        if len(line) > MAX_LINE_BYTES:
            log.warning("skipping an oversized line in %s at byte %d", path, position)
        elif line.strip():
            try:
                message = to_message(json.loads(line))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                log.warning("skipping a malformed line in %s at byte %d: %s", path, position, error)
            else:
                size += message.ByteSize() + 4  # + the field's tag and length prefix
                if size > max_bytes:
                    break
                request.attestations.append(message)
        position = next_position
    return position
