"""The capacity benchmark (figure e) end to end, small: a real ``coordinator serve`` (TLS) on sqlite and
then on a throwaway PostgreSQL server, 8 simulated peers in two load-generator processes, each admitted
with its own identity, heartbeating and reporting through the peer's signed calls; every process it
started (the PostgreSQL server included) is gone afterwards.

About 40 s (load average 5) to 80 s (load 18) on a shared 2-core box: two serves' start and stop and the
load generators' imports are most of it, not the 4 s windows.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks.postgres_server import binaries
from benchmarks.procs import proc_stat

PEERS = 8
FIELDS = ("peers", "heartbeats_per_s", "heartbeat_p50_ms", "heartbeat_p99_ms", "reports_per_s", "report_p99_ms",
          "coordinator_cpu", "rss_mb", "load_generator_cpu")


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.swarm
def test_capacity_benchmark_drives_a_real_coordinator(tmp_path):
    """Both stores in one invocation, tiny N (the PostgreSQL half skips only without the server's binaries)."""
    stores = ["sqlite", "postgresql"] if binaries() is not None else ["sqlite"]
    out = tmp_path / "capacity.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "capacity", "--peers", str(PEERS), "--seconds", "4",
                           "--warmup", "1", "--stores", ",".join(stores), "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures) == {"sqlite", "postgresql"}
    if "postgresql" not in stores:
        assert figures["postgresql"] is None
    assert set(figures["sqlite"]) == set(figures["postgresql"] or figures["sqlite"])  # the same keys
    for store in stores:
        _check(figures[store], store)
    if "postgresql" in stores:
        assert figures["sqlite"]["database_cpu"] is None and figures["postgresql"]["database_rss_mb"] > 0
        postmaster = figures["postgresql"]["processes"]["database_server"]
        assert postmaster and not _alive(postmaster), "the PostgreSQL server is still running"


def _check(figures: dict, store: str) -> None:
    assert figures["store"] == store
    for field in FIELDS:
        assert isinstance(figures[field], (int, float)), (store, field, figures)
    assert figures["peers"] == figures["admitted"] == PEERS
    counts = figures["counts"]
    assert counts["Heartbeat_ok"] > 0 and counts["Report_ok"] > 0, (store, counts)
    assert figures["errors"] == [] and set(counts) <= {"Heartbeat_ok", "Report_ok", "lists_refreshed_before",
                                                       "lists_refreshed_in_window"}, (store, counts)
    assert figures["heartbeats_per_s"] > 0 and figures["reports_per_s"] > 0
    assert 0 < figures["coordinator_cpu"] and figures["rss_mb"] > 0
    processes = figures["processes"]
    assert processes["left_behind"] == []
    started = processes["serve_tree"] + processes["load_generators"]
    assert len(processes["serve_tree"]) >= 2 and len(processes["load_generators"]) == 2
    assert not [pid for pid in started if _alive(pid)], f"a process the benchmark started ({store}) is still running"


def test_stores_option():
    """--stores: known names once each; postgresql without the server's binaries is an error, not a skip."""
    from benchmarks.capacity import parse_stores

    assert parse_stores("sqlite") == (["sqlite"], None)
    for bad in ("", "mysql", "sqlite,sqlite", "sqlite,,mysql"):
        stores, note = parse_stores(bad)
        assert stores == [] and note.startswith("error: --stores"), bad
    default, note = parse_stores(None)
    if binaries() is None:
        assert default == ["sqlite"] and note.startswith("note: no PostgreSQL")
        assert parse_stores("postgresql")[1].startswith("error: --stores postgresql needs")
    else:
        assert default == ["sqlite", "postgresql"] and note is None
        assert parse_stores("postgresql,sqlite") == (["postgresql", "sqlite"], None)


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
