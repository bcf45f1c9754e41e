"""The capacity benchmark (figure e) end to end, small: a real ``coordinator serve`` (TLS), 20 simulated
peers in two load-generator processes, each admitted with its own identity, heartbeating and
reporting through the peer's signed calls; every process it started is gone afterwards.

About 40-55 s on a loaded 2-core box: serve's start and stop and the load generators' imports are most of it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks.procs import proc_stat

FIELDS = ("peers", "heartbeats_per_s", "heartbeat_p50_ms", "heartbeat_p99_ms", "reports_per_s", "report_p99_ms",
          "coordinator_cpu", "rss_mb", "load_generator_cpu")


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.swarm
def test_capacity_benchmark_drives_a_real_coordinator(tmp_path):
    out = tmp_path / "capacity.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "capacity", "--peers", "20", "--seconds", "5", "--warmup", "2",
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


def test_run_copy_and_server_latency(tmp_path):
    """The run copy keeps the example but for the interval, no last epoch and a matching timeout; the
    server-side figures are read from two scrapes of the latency histogram (window = their difference)."""
    from benchmarks.capacity import server_latency, write_run
    from peer.runconfig import load_run_config

    config = load_run_config(write_run(tmp_path / "run.toml", 0.5))
    assert (config.heartbeat_interval, config.epochs, config.peer_timeout) == (0.5, 0, 10.0)
    assert config.run_id == "digits-demo" and config.averaging.strategy == "sync"

    def scrape(counts):
        return "\n".join(f'potluck_rpc_latency_seconds_bucket{{code="OK",le="{le}",method="Heartbeat"}} {n}'
                         for le, n in counts)

    before = scrape([("0.005", 10), ("0.05", 10), ("+Inf", 10)])
    after = scrape([("0.005", 60), ("0.05", 109), ("+Inf", 110)])  # in the window: 50 <= 5 ms, 99 <= 50 ms
    assert server_latency(before, after, "Heartbeat") == {"calls": 100, "p50_ms_at_most": 5.0,
                                                          "p99_ms_at_most": 50.0}
    assert server_latency("", "", "Report") == {"calls": 0, "p50_ms_at_most": None, "p99_ms_at_most": None}
