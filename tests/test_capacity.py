"""The capacity benchmark (figure e) end to end, small: a real ``coordinator serve`` (TLS), 20 simulated
peers in two load-generator processes, each admitted with its own identity, heartbeating and
reporting through the peer's signed calls; every process it started is gone afterwards.

About 35-45 s on a loaded 2-core box (serve's start and the load generators' imports are most of it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.swarm

FIELDS = ("peers", "heartbeats_per_s", "heartbeat_p50_ms", "heartbeat_p99_ms", "reports_per_s", "report_p99_ms",
          "coordinator_cpu", "rss_mb", "load_generator_cpu")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_capacity_benchmark_drives_a_real_coordinator(tmp_path):
    out = tmp_path / "capacity.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "capacity", "--peers", "20", "--seconds", "6",
                           "--out", str(out), "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["postgresql"] is None  # no PostgreSQL store yet
    sqlite = figures["sqlite"]
    for field in FIELDS:
        assert isinstance(sqlite[field], (int, float)), (field, sqlite)
    assert sqlite["peers"] == sqlite["admitted"] == 20
    counts = sqlite["counts"]
    assert counts["Heartbeat_ok"] > 0 and counts["Report_ok"] > 0, counts
    assert sqlite["errors"] == [] and set(counts) <= {"Heartbeat_ok", "Report_ok", "lists_refreshed_before",
                                                      "lists_refreshed_in_window"}, counts
    assert sqlite["heartbeats_per_s"] > 0 and sqlite["reports_per_s"] > 0
    assert 0 < sqlite["coordinator_cpu"] and sqlite["rss_mb"] > 0
    processes = sqlite["processes"]
    assert processes["left_behind"] == []
    started = processes["serve_tree"] + processes["load_generators"]
    assert len(processes["serve_tree"]) >= 2 and len(processes["load_generators"]) == 2
    assert not [pid for pid in started if _alive(pid)], "a process the benchmark started is still running"
