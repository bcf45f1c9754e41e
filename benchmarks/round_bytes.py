"""Wire bytes per DiLoCo round, per host, from a finished harness run's workdir (codec comparisons).

    python -m benchmarks.round_bytes WORKDIR

Figure (c) divides all bytes in a window by the samples trained; with a sparse codec the
pseudo-gradient is no longer what dominates that window, so this splits it. For each arm under
WORKDIR/arms it prints, between peer 0's first and last round events: the encoded pseudo-gradient
one peer sent (its round events' payload_bytes), and per round what each initial peer downloaded
(the other peers' parts and averaged parts, plus its control traffic) and uploaded (including the
state the coordinator's host downloads from it), and what the coordinator's host took in.
Counter columns are in host order: the coordinator's host, the initial peers, the late joiner
(benchmarks/runner.py starts the byte sampler with the hosts in that order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arm_round_bytes(arm_dir: Path, peers: int) -> dict | None:
    """Per-round byte figures of one arm (None when it has fewer than two rounds or no counters)."""
    rounds = [e for e in _lines(arm_dir / "peer0" / "events.jsonl") if e.get("event") == "round"]
    counters = arm_dir / "counters.jsonl"
    if len(rounds) < 2 or not counters.exists():
        return None
    samples = _lines(counters)

    def at(t: float) -> dict:
        return min(samples, key=lambda s: abs(s["t"] - t))

    first, last = at(rounds[0]["time"]), at(rounds[-1]["time"])
    ifaces = [key for key in first if key != "t"]
    # each iface holds [tx, rx] of the hub's end: tx = into the host, rx = out of the host
    moved = {key: (last[key][0] - first[key][0], last[key][1] - first[key][1]) for key in ifaces}
    n = len(rounds) - 1
    peer_ifaces = ifaces[1:1 + peers]
    return {
        "rounds": n,
        "payload_bytes": round(sum(r.get("payload_bytes", 0) for r in rounds[1:]) / n),
        "peer_download_per_round": [round(moved[key][0] / n) for key in peer_ifaces],
        "peer_upload_per_round": [round(moved[key][1] / n) for key in peer_ifaces],
        "coordinator_host_in_per_round": round(moved[ifaces[0]][0] / n),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.round_bytes WORKDIR", file=sys.stderr)
        return 2
    arms = Path(argv[0]) / "arms"
    if not arms.is_dir():
        print(f"error: {arms} is not a folder: pass the --workdir of a `python -m benchmarks run`", file=sys.stderr)
        return 2
    for arm_dir in sorted(arms.iterdir()):
        peers = len(list(arm_dir.glob("peer[0-9]*")))
        figures = arm_round_bytes(arm_dir, peers) if peers else None
        print(f"{arm_dir.name}: {json.dumps(figures) if figures else 'no rounds or counters'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
