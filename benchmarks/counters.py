"""Wire-byte sampler: reads /sys/class/net/<iface>/statistics/{tx,rx}_bytes every INTERVAL seconds
and appends one JSON line per sample, so byte counts can be cut to any time window afterwards.

Runs inside the hub namespace (where the hosts' veth ends live):
``python -m benchmarks.counters OUT INTERVAL MAX_SECONDS IFACE...``; it stops by itself after
MAX_SECONDS, or when killed.
"""

from __future__ import annotations

import bisect
import json
import sys
import time
from pathlib import Path


def read(iface: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def sample_forever(out: Path, interval: float, max_seconds: float, ifaces: list[str]) -> None:
    deadline = time.monotonic() + max_seconds
    with open(out, "a", buffering=1) as file:
        while time.monotonic() < deadline:
            file.write(json.dumps({"t": time.time(), **{iface: read(iface) for iface in ifaces}}) + "\n")
            time.sleep(interval)


class CounterSeries:
    """The samples of one sampler run, with byte counts interpolated at any time."""

    def __init__(self, samples: list[dict]):
        self.samples = sorted(samples, key=lambda s: s["t"])
        self.times = [s["t"] for s in self.samples]

    @classmethod
    def load(cls, path: Path) -> "CounterSeries":
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        samples = []
        for line in lines:
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by the kill
                pass
        return cls(samples)

    def at(self, when: float, iface: str, direction: int) -> float:
        """Counter value of iface (0: tx, 1: rx) at time `when`, linearly interpolated."""
        if not self.samples:
            raise ValueError("no counter samples were recorded")
        i = bisect.bisect_left(self.times, when)
        if i <= 0:
            return float(self.samples[0][iface][direction])
        if i >= len(self.samples):
            return float(self.samples[-1][iface][direction])
        a, b = self.samples[i - 1], self.samples[i]
        share = (when - a["t"]) / max(b["t"] - a["t"], 1e-9)
        return a[iface][direction] + share * (b[iface][direction] - a[iface][direction])

    def bytes_between(self, start: float, end: float, iface: str, direction: int) -> float:
        return self.at(end, iface, direction) - self.at(start, iface, direction)


if __name__ == "__main__":
    sample_forever(Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:])
