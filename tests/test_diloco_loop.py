"""DiLoCo through the one run loop (peer/loop.py): proof in every report, credit shown, eviction exits 3.

Real coordinator and real `peer join` processes on 127.0.0.1; the replay is coordinator/phase_replay.py,
the function the auditor is to call for DiLoCo reports.
"""

from __future__ import annotations

import json
import signal
import sqlite3

import torch

from conftest import epochs_reported, events, start_coordinator, start_peer, wait_until, write_run
from coordinator.books.ledger import LEDGER_FILE
from coordinator.phase_replay import replay_phase
from coordinator.replay import judge
from examples.digits import TASK
from peer.runconfig import load_run_config
from peer.sketch import Sketch, parameter_fingerprint, parameter_seed

PEER_EXIT = 240
INNER_STEPS = 8


def report_bodies(coordinator_dir) -> list[dict]:
    with sqlite3.connect(f"file:{coordinator_dir / LEDGER_FILE}?mode=ro", uri=True) as db:
        return [json.loads(body) for (body,) in db.execute("SELECT body FROM credit_reports ORDER BY epoch")]


def sketch_of(entry: dict) -> Sketch:
    return Sketch(entry["norm"], tuple(entry["projection"]))


def test_diloco_reports_carry_replayable_proof_and_an_evicted_peer_exits_3(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=0, strategy="diloco", inner_steps=INNER_STEPS,
                    matchmaking_time=1.0)  # no end: the peers train until evicted or stopped
    config = load_run_config(run)
    assert config.averaging.strategy == "diloco" and not config.averaging.overlap
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    honest = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "honest")
    partner = start_peer(procs, coordinator.address, coordinator.issue_token("partner"), tmp_path / "partner")
    wait_until(lambda: len(epochs_reported(tmp_path / "honest")) >= 2 and
               len(epochs_reported(tmp_path / "partner")) >= 2, 180, "two DiLoCo rounds of both peers")

    # the panel's figures reach DiLoCo's events too: credit and audits from the heartbeat replies
    epoch_events = [e for e in events(tmp_path / "honest") if e["event"] == "epoch"]
    assert all({"credit", "credit_verified", "audits_passed", "audits_failed"} <= set(e) for e in epoch_events)
    assert all(e["peers"] == 2 for e in epoch_events)

    # removing the partner's org evicts it: it stops training and exits 3 with an error line
    removed = coordinator_cli("org", "remove", "partner", coordinator=coordinator)
    assert removed.returncode == 0 and "1 peer(s) evicted" in removed.stdout, removed.stdout + removed.stderr
    assert partner.wait(PEER_EXIT) == 3, partner.log()[-3000:]
    assert "error: evicted from the run" in partner.log()
    finished = [e for e in events(tmp_path / "partner") if e["event"] == "finished"]
    assert finished and finished[-1]["reason"].startswith("evicted")

    honest.popen.send_signal(signal.SIGTERM)
    assert honest.wait(PEER_EXIT) == 0, honest.log()[-3000:]

    # every DiLoCo report carries proof: one sketch per inner step, samples that add up
    bodies = report_bodies(coordinator.data_dir)
    assert bodies
    for body in bodies:
        assert [s["index"] for s in body["sketches"]] == list(range(len(body["sketches"])))
        assert len(body["sketches"]) % INNER_STEPS == 0 and len(body["sketches"]) >= INNER_STEPS
        assert sum(s["samples"] for s in body["sketches"]) == body["samples"]
        assert len(body["parameters"]["projection"]) == config.verification.sketch_dims

    # epoch 0's phase started at the initial model (the anchor of epoch 0): the auditor's replay of
    # every inner step, with a fresh inner optimizer, matches what each peer reported
    anchor = TASK.build_model(config.seed).state_dict()
    first = [body for body in bodies if body["epoch"] == 0]
    assert len(first) == 2
    tolerance = config.verification.fp32_tolerance
    for body in first:
        model = TASK.build_model(config.seed)
        fingerprint = parameter_fingerprint(model, parameter_seed(config.seed, 0), config.verification.sketch_dims)
        assert judge(sketch_of(body["parameters"]), fingerprint, tolerance).verdict == "pass"
        replayed = replay_phase(TASK, config, anchor, body, upto=len(body["sketches"]) - 1)
        verdicts = [judge(sketch_of(entry), done.sketch, tolerance) for entry, done in zip(body["sketches"], replayed)]
        assert all(v.verdict == "pass" for v in verdicts), [(v.verdict, v.relative_error) for v in verdicts]
        assert [done.samples for done in replayed] == [s["samples"] for s in body["sketches"]]
    # the comparison has teeth: step j replayed at the anchor (not after steps 0..j-1) does not match
    body, last = first[0], len(first[0]["sketches"]) - 1
    from peer.work import do_micro_batch

    model = TASK.build_model(config.seed)
    inputs, targets = TASK.train_data()
    stale = do_micro_batch(TASK, model, inputs, targets, run_seed=config.seed, epoch=0, peer_id=body["peer_id"],
                           micro_batch=last, micro_batch_size=config.micro_batch_size,
                           sketch_dims=config.verification.sketch_dims, device=torch.device("cpu"))
    assert judge(sketch_of(body["sketches"][last]), stale.sketch, tolerance).verdict != "pass"


def coordinator_cli(*args, coordinator):
    from conftest import cli

    return cli("coordinator", *args, "--data-dir", str(coordinator.data_dir))
