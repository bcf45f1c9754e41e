"""Heartbeat and Join cost O(1) in the run's size: the benchmark's own measurement at two sizes.

A ratio, not a timing: the calls alternate between the two ledgers round by round (see
benchmarks/coordinator_scale.py), so a busy machine slows both alike. Before the hot paths were
cached, a Heartbeat at 2,000 peers cost about 10x one at 200.
"""

from __future__ import annotations

from benchmarks.coordinator_scale import measure


def test_heartbeat_and_join_cost_does_not_grow_with_the_peers(tmp_path):
    figures = measure([200, 2000], calls=120, reports=3, workdir=tmp_path)
    small, large = figures["200"], figures["2000"]
    for kind in ("heartbeat", "join"):
        ratio = large[kind]["median_ms"] / small[kind]["median_ms"]
        assert ratio < 4, (kind, ratio, figures)
