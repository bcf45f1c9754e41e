"""Attestation records: what each member of an all-reduce sent and received, as sketches.

The contract (shared docs, attestations.md): per sync gradient round ("grad") and DiLoCo delta round
("diloco_delta"), each member appends to ``<data dir>/attestations.jsonl`` one "sent" record per
reducer it sent parts to (itself included) and, as a reducer, one "received" record per sender. A
record sums over parts the ``slice_sketch`` of the decoded part at its offset in the flattened
vector, under the SENDER's epoch seed, so a sender's "sent" sketches add up to the sketch of what
it put in, and the binding side can compare them with its signed report and with the reducers'
"received" records. Each line is one ``os.write`` on an O_APPEND file (a reader never sees half a
line); the writer is the averager's forked process.

A reducer's own result is checked too (``reducer_evidence.jsonl``): a returned average implausibly
far from this member's own part is recorded (the reducer alone decides its part, HIVEMIND_NOTES 14).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.sketch import gradient_seed, slice_sketch

ATTESTATION_FILE = "attestations.jsonl"
REDUCER_EVIDENCE_FILE = "reducer_evidence.jsonl"
KINDS = ("grad", "diloco_delta")
# a returned average farther than this many times our own part's norm from our part is recorded:
# an honest robust center lies within the group's spread, a flipped x10 one about 11 norms away
SUSPECT_RATIO = 5.0


@dataclass(frozen=True)
class Attestations:
    """Where and how one averager writes its records (None on averagers that attest nothing)."""

    data_dir: Path
    kind: str  # "grad" | "diloco_delta"
    run_seed: int
    dims: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attestation kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class _Record:
    role: str
    sender: str
    reducer: str
    epoch: int
    length: int = 0
    sketch: torch.Tensor | None = None
    norm_sq: float = 0.0
    weight: float = 0.0
    score: float = 0.0
    clipped: bool = False


@dataclass
class RoundRecords:
    """Sums the parts of one round per (role, sender, reducer), then appends them as JSON lines."""

    config: Attestations
    group: str
    sizes: list[int]
    records: dict = field(default_factory=dict)

    def add(self, role: str, sender: str, reducer: str, epoch: int, values: torch.Tensor, offset: int,
            weight: float = 0.0, score: float = 0.0, clipped: bool = False) -> None:
        record = self.records.setdefault((role, sender, reducer), _Record(role, sender, reducer, epoch))
        sketch = slice_sketch(values, offset, self.sizes, gradient_seed(self.config.run_seed, epoch), self.config.dims)
        projection = torch.tensor(sketch.projection, dtype=torch.float64)
        record.sketch = projection if record.sketch is None else record.sketch + projection
        record.length += values.numel()
        record.norm_sq += sketch.norm ** 2
        record.weight = float(weight)
        record.score = max(record.score, float(score))
        record.clipped = record.clipped or bool(clipped)

    def lines(self) -> list[str]:
        now = time.time()
        return [json.dumps({
            "v": 1, "role": r.role, "kind": self.config.kind, "group": self.group, "epoch": int(r.epoch),
            "sender": r.sender, "reducer": r.reducer, "length": r.length,
            "sketch": [float(x) for x in r.sketch.tolist()], "norm_sq": r.norm_sq,
            "weight": r.weight,  # sent: the weight this sender declared; received: the one the reducer saw
            "score": (r.score if r.score != float("inf") else 1e30) if r.role == "received" else 0.0,
            "clipped": bool(r.clipped) if r.role == "received" else False,
            "time": now,
        }) for r in self.records.values() if r.sketch is not None]

    def write(self) -> None:
        append_lines(Path(self.config.data_dir) / ATTESTATION_FILE, self.lines())


def append_lines(path: Path, lines: list[str]) -> None:
    """Append each line with one write() on an O_APPEND descriptor (whole lines only)."""
    if not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for line in lines:
            os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_records(data_dir: Path) -> list[dict]:
    """Every complete record in ``data_dir``'s attestation file (for tests and the binding side)."""
    path = Path(data_dir) / ATTESTATION_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
