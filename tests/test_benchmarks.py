"""The benchmark harness: its formulas on hand-computed inputs, the lab's setup and teardown, its
cleanup on Ctrl-C, and the JSON of a tiny real run. The numbers are benchmarks, never asserted here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import formulas
from benchmarks.__main__ import parse_arm
from benchmarks.arms import Arm, ArmRun, PeerRecord, Workload, run_toml
from benchmarks.counters import CounterSeries
from benchmarks.figures import arm_stats, figure_b, figure_c, strategy_payload
from benchmarks.netns import Host, NetnsLab, existing_namespaces, namespaces_available
from benchmarks.reference import Curve
from benchmarks.report import goal_status, table

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(not namespaces_available()[0],
                                reason=f"network namespaces unavailable: {namespaces_available()[1]}")


# -- formulas, by hand ---------------------------------------------------------------------------
def test_allreduce_bound_matches_the_anchor_table():
    # BENCHMARKS.md: 4 MB at 20 Mbit/s is 1.6 s for 2 peers and 2.4 s for 4
    assert formulas.allreduce_bound_seconds(2, 4e6, 20e6) == pytest.approx(1.6)
    assert formulas.allreduce_bound_seconds(4, 4e6, 20e6) == pytest.approx(2.4)
    assert formulas.allreduce_bound_seconds(1, 4e6, 20e6) == 0
    assert formulas.round_efficiency(1.6, 2.0) == pytest.approx(0.8)


def test_compute_utilization_and_its_blocking_bound():
    assert formulas.compute_utilization([3.0, 1.0], 2.0) == pytest.approx(1.0)
    assert formulas.compute_utilization([1.0, 1.0], 4.0) == pytest.approx(0.25)
    # 10 s of compute, then 1 MB among 4 peers at 20 Mbit/s: 1.5 MB * 8 / 19.2 Mbit/s = 0.625 s
    assert formulas.blocking_cu_bound(10.0, 4, 1e6, 20e6) == pytest.approx(10 / 10.625)


def test_bytes_per_sample_references():
    assert formulas.diloco_reduction(100, "uint8") == 400
    assert formulas.diloco_reduction(500, "none") == 500
    assert formulas.payload_bytes(1000, "fp16") == 2000
    # 2 peers, 1000 fp32 parameters, micro-batches of 32: each peer uploads 4000 B per 64 samples
    assert formulas.data_parallel_bytes_per_sample(2, 1000, 32) == pytest.approx(125.0)
    assert formulas.speedup(10.0, 4.0) == 2.5
    assert formulas.transfer_bound_seconds(1.2e6, 10e6) == pytest.approx(1.0)


def test_reference_curve_interpolates():
    curve = Curve(samples=[0, 100, 200], loss=[2.0, 1.0, 0.5], step_seconds=0.01)
    assert curve.loss_at(50) == pytest.approx(1.5)
    assert curve.loss_at(200) == pytest.approx(0.5)
    assert curve.loss_at(201) is None
    assert curve.samples_to(0.75) == pytest.approx(150)
    assert curve.samples_to(0.1) is None


def test_counter_series_interpolates_between_samples():
    series = CounterSeries([{"t": 10.0, "v1": [0, 100]}, {"t": 12.0, "v1": [200, 300]}])
    assert series.at(11.0, "v1", 0) == pytest.approx(100)
    assert series.bytes_between(10.5, 11.5, "v1", 1) == pytest.approx(100)
    assert series.at(99.0, "v1", 0) == 200  # clamped past the last sample


# -- figures from recorded events ------------------------------------------------------------------
def _epoch(time_, epoch, samples, compute, loss):
    return {"event": "epoch", "time": time_, "epoch": epoch, "samples": samples, "compute_seconds": compute,
            "metrics": {"loss": loss}}


def _run(averaging=None) -> ArmRun:
    support = Host("c", "10.77.0.1", "ns-c", "v1", None)
    hosts = [Host(f"p{i}", f"10.77.0.{i + 2}", f"ns-p{i}", f"v{i + 2}", 20.0) for i in range(3)]
    peers = [
        PeerRecord("p0", hosts[0], 0.0, False, [_epoch(10, 0, 64, 1.0, 2.0), _epoch(20, 1, 64, 4.0, 1.0),
                                                  _epoch(30, 2, 64, 4.0, 0.4)]),
        PeerRecord("p1", hosts[1], 0.0, False, [_epoch(10, 0, 64, 1.0, 2.0), _epoch(20, 1, 64, 6.0, 1.0),
                                                  _epoch(30, 2, 64, 6.0, 0.4)]),
        PeerRecord("late", hosts[2], 15.0, True, [{"event": "joined", "time": 17.0},
                                                    {"event": "state_loaded", "time": 22.0},
                                                    _epoch(30, 2, 32, 2.0, 0.4)]),
    ]
    # per second: every host uploads 100 B (hub end rx), and 50 B/s flow to the late host (its hub end tx)
    samples = [{"t": float(t), "v1": [0, 100 * t], "v2": [0, 100 * t], "v3": [0, 100 * t], "v4": [50 * t, 100 * t]}
               for t in range(0, 41)]
    workload = Workload(peers=2, micro_batch=32, target_batch=128)
    return ArmRun(Arm("sync", "potluck", averaging or {}), workload, peers, support, CounterSeries(samples), 0.0, 40.0)


def test_arm_stats_by_hand():
    stats = arm_stats(_run(), target_loss=0.5)
    # steady state = epochs after the first: compute 8 + 12 over 20 s + 20 s of wall
    assert stats.cu == pytest.approx(20 / 40)
    assert stats.compute_per_round == pytest.approx(5.0)
    # window 10..30 s: support + p0 + p1 upload 3 * 100 B/s, minus 50 B/s to the late host => 250 B/s * 20 s
    assert stats.window_bytes == pytest.approx(5000)
    assert stats.bytes_per_sample == pytest.approx(5000 / 256)
    # loss 0.4 <= 0.5 first at t=30, after 64*6 + 32 samples
    assert stats.seconds_to_target == 30
    assert stats.samples_to_target == 416
    assert stats.join_seconds == pytest.approx(15.0)
    assert stats.join_parts == {"joined": 2.0, "state_loaded": 7.0}


def test_strategy_payload_and_figure_c_bound():
    run = _run({"strategy": "diloco", "inner_steps": 100, "compression": "uint8"})
    size, samples, overlapped = strategy_payload(run, parameters=1000)
    assert (size, samples, overlapped) == (1000, 2 * 100 * 32, False)
    sync_size, sync_samples, _ = strategy_payload(_run(), parameters=1000)
    assert (sync_size, sync_samples) == (8000, 128)  # fp32 gradients + parameters per target batch
    stats = arm_stats(run, 0.5)
    figure = figure_c(run, stats, stats, Curve([0, 1000], [2.0, 0.4], 0.01), parameters=1000)
    assert figure["bound"] == pytest.approx(2 * 1000 / 6400)
    assert figure["reduction_vs_baseline"] == pytest.approx(1.0)
    assert figure["loss_ratio"] == pytest.approx(0.4 / (2.0 - 1.6 * 416 / 1000))


def test_figure_b_takes_the_slowest_peer_and_the_median_round():
    rows = [{"config": config, "round": r, "index": i, "total": total + i, "data": 1.0 + i, "formation": 0.0,
             "max_error": 0.0, "error": ""} for config, total in (("potluck", 1.0), ("baseline", 7.0))
            for r in range(3) for i in range(2)]
    figure = figure_b(rows, peers=2, payload=4_000_000, rate_bps=20e6)
    assert figure["bound_s"] == pytest.approx(1.6)
    assert figure["potluck"]["round_s"] == 2.0
    assert figure["value"] == pytest.approx(0.8)
    assert figure["baseline"] == pytest.approx(0.2)
    assert figure["data_phase"] == pytest.approx(0.8)


def test_goals_and_table():
    assert goal_status("b", {"value": 0.81}) == "met"
    assert goal_status("b", {"value": 0.5}) == "MISSED"
    assert goal_status("c", {"reduction_vs_baseline": 500, "loss_ratio": 1.03}) == "MISSED"
    assert goal_status("d", {"value": 3.0}) == "(no goal)"
    text = table({"b": {"value": 0.81, "bound": 1.0, "baseline": 0.2}, "meta": {"mode": "netns", "notes": ["x"]}})
    assert "averaging round efficiency" in text and "met" in text and "note: x" in text


def test_arms_come_from_run_toml_values():
    arm = parse_arm("diloco:strategy=diloco,inner_steps=100,compression=uint8,outer_lr=0.7,overlap=true")
    assert arm == Arm("diloco", "potluck", {"strategy": "diloco", "inner_steps": 100, "compression": "uint8",
                                            "outer_lr": 0.7, "overlap": True})
    assert parse_arm("baseline").kind == "baseline"
    text = run_toml(Workload(peers=3), arm, "bench-x")
    assert '[averaging]\nstrategy = "diloco"\ninner_steps = 100' in text and "min_peers = 3" in text


# -- the lab: namespaces, shaping, teardown ------------------------------------------------------------
@needs_root
def test_a_new_lab_removes_what_a_killed_lab_left():
    """A lab whose process was killed (SIGKILL: no close) leaves namespaces; the next lab deletes them,
    and never a live process's."""
    from benchmarks.netns import reclaim_orphans

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    orphan, alive = f"plk-{dead.pid}-h1", f"plk-{os.getpid()}-keep"
    for name in (orphan, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert orphan in reclaim_orphans()
        assert existing_namespaces(orphan) == [] and existing_namespaces(alive) == [alive]
    finally:
        for name in (orphan, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_root
def test_lab_shapes_links_and_leaves_nothing_behind():
    lab = NetnsLab(prefix=f"plk-{os.getpid()}-t-")
    try:
        support, peer = lab.hosts_for(1, 20.0)
        qdisc = subprocess.run(["ip", "netns", "exec", peer.namespace, "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "20Mbit" in qdisc
        assert support.address != peer.address and support.address.startswith("10.77.0.")
        stats = subprocess.run(lab.counter_command() + ["cat", f"/sys/class/net/{peer.hub_interface}/statistics/rx_bytes"],
                               capture_output=True, text=True)
        assert stats.returncode == 0 and stats.stdout.strip().isdigit()
        assert len(existing_namespaces(lab.prefix)) == 3  # hub + 2 hosts
    finally:
        assert lab.close() == []
    assert existing_namespaces(lab.prefix) == []
    assert "plk" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def test_loopback_fallback_says_so(monkeypatch, tmp_path):
    from benchmarks import runner

    monkeypatch.setattr(runner, "namespaces_available", lambda: (False, "not root (test)"))
    plan = runner.Plan(Workload(peers=2), [Arm("baseline", "baseline")], figures=())
    results = runner.run(plan, tmp_path, log=lambda line: None)
    assert results["meta"]["mode"] == "loopback"
    assert results["meta"]["unshaped_loopback_mbit"] > 0
    assert any("loopback mode: not root (test)" in note for note in results["meta"]["notes"])


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _bench(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks", "run", *args, "--workdir", str(tmp_path / "work")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@needs_root
def test_ctrl_c_removes_every_namespace_and_process(tmp_path):
    bench = _bench(tmp_path, "--smoke", "--out", str(tmp_path / "out.json"))
    prefix = f"plk-{bench.pid}-"
    try:
        # wait until it has namespaces and at least one swarm process of its own
        _wait_until(lambda: len(existing_namespaces(prefix)) > 3 and len(_processes_mentioning(str(tmp_path))) > 1,
                    60, "the benchmark to start its swarms")
        os.kill(bench.pid, signal.SIGINT)
        bench.wait(timeout=60)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    assert existing_namespaces(prefix) == []
    _wait_until(lambda: _processes_mentioning(str(tmp_path)) == [], 15, "every process it started to end")


@pytest.mark.slow
@needs_root
def test_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "out.json"
    bench = _bench(tmp_path, "--smoke", "--out", str(out))
    try:
        output, _ = bench.communicate(timeout=240)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, output[-3000:]
    results = json.loads(out.read_text())
    for letter in ("a", "b", "c", "d", "f", "g"):
        assert {"value", "unit", "bound", "baseline"} <= set(results[letter]), letter
    assert "loss_ratio" in results["c"]
    meta = results["meta"]
    for key in ("mode", "peers", "link_mbit", "simulated_compute", "unshaped_loopback_mbit", "date", "git_commit"):
        assert key in meta, key
    assert meta["mode"] == "netns" and meta["leftover_namespaces"] == []
    assert results["b"]["potluck"]["values_correct"] and results["b"]["potluck"]["rounds_ok"] >= 1
    assert "compute utilization" in output and "wrote" in output
    assert existing_namespaces(f"plk-{bench.pid}-") == []
    _wait_until(lambda: _processes_mentioning(str(tmp_path)) == [], 15, "every process it started to end")


def test_round_bytes_splits_a_window_by_host_per_round(tmp_path):
    from benchmarks.round_bytes import arm_round_bytes

    arm = tmp_path / "arms" / "diloco-sparse-0"
    for name in ("peer0", "peer1"):
        (arm / name).mkdir(parents=True)
    rounds = [{"event": "round", "time": t, "payload_bytes": p} for t, p in ((10.0, 900), (20.0, 1000), (30.0, 1200))]
    (arm / "peer0" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in rounds))
    samples = [  # [into the host, out of the host] per iface, host order: coordinator, peer0, peer1, late
        {"t": 10.0, "v1": [0, 0], "v2": [100, 50], "v3": [100, 50], "v4": [0, 0]},
        {"t": 30.1, "v1": [4000, 10], "v2": [300, 2050], "v3": [500, 1050], "v4": [7, 7]},
    ]
    (arm / "counters.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert arm_round_bytes(arm, peers=2) == {
        "rounds": 2, "payload_bytes": 1100, "peer_download_per_round": [100, 200],
        "peer_upload_per_round": [1000, 500], "coordinator_host_in_per_round": 2000}
    assert formulas.BITS["sparse"] == 1 / 32 * 12 + 8 / 256  # one gap byte + 4 bits per sent value, a byte per chunk


def test_codec_quality_combines_as_the_all_reduce_does():
    import torch

    from benchmarks.codec_quality import Combine, parse_arm
    from peer.compression import make_compression, round_trip
    from peer.sparse_codec import sparsify

    assert parse_arm("sparse:bits=8,density=0.0625,outer_momentum=0.5") == (
        "sparse", {"bits": 8, "density": 0.0625}, {"outer_momentum": 0.5})
    deltas = [[torch.randn(300, generator=torch.Generator().manual_seed(seed))] for seed in (1, 2)]
    combine = Combine("sparse", 2, [(300,)])
    (got,) = combine(deltas)
    sent = [sparsify(d[0], 256, 1 / 32, 4) for d in deltas]
    assert torch.equal(got, round_trip((sent[0] + sent[1]) / 2, make_compression("sparse"))[0])
    torch.testing.assert_close(combine.feedback[0].residual[0], deltas[0][0] - sent[0])
    assert 0 < combine.up[0] < 300 and 0 < combine.down[0] < 300
