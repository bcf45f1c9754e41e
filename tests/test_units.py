"""Fast in-process tests: data assignment, run config, ledger, task loading."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from conftest import DIGITS_RUN
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import tokens
from coordinator.books.ledger import Ledger, LedgerError
from peer.assignment import micro_batch_indices
from peer.errors import UserError
from peer.runconfig import load_run_config, parse_run_config
from peer.task import load_task

# --- assignment ----------------------------------------------------------------------------------

SIZE, BATCH = 1437, 32


def indices(seed=7, epoch=3, peer="p-aaaa", micro_batch=5, size=SIZE, batch=BATCH) -> torch.Tensor:
    return micro_batch_indices(seed, epoch, peer, micro_batch, size, batch)


def test_assignment_is_deterministic():
    assert torch.equal(indices(), indices())


@pytest.mark.parametrize("change", [
    {"peer": "p-bbbb"}, {"epoch": 4}, {"micro_batch": 6}, {"seed": 8},
], ids=["peer", "epoch", "micro-batch", "seed"])
def test_assignment_depends_on_every_input(change):
    assert not torch.equal(indices(), indices(**change))


@pytest.mark.parametrize("size, batch", [(SIZE, BATCH), (10, 10), (5, 32)])
def test_assignment_unique_and_in_range(size, batch):
    for micro_batch in range(20):
        chosen = indices(micro_batch=micro_batch, size=size, batch=batch).tolist()
        assert len(chosen) == min(size, batch)
        assert len(set(chosen)) == len(chosen)
        assert all(0 <= i < size for i in chosen)


# --- run config ----------------------------------------------------------------------------------

def test_shipped_run_config_parses():
    config = load_run_config(DIGITS_RUN)
    assert config.run_id == "digits-demo"
    assert config.task_name == "examples.digits"
    assert config.task_version == "1"
    assert config.micro_batch_size <= config.target_batch_size
    assert config.text == DIGITS_RUN.read_text()


def test_unknown_section_rejected():
    with pytest.raises(UserError, match=r"unknown section \[extras\]"):
        parse_run_config(DIGITS_RUN.read_text() + "\n[extras]\nx = 1\n")


def test_unknown_key_rejected():
    text = DIGITS_RUN.read_text().replace("[run]\n", "[run]\ncolour = 1\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) in \[run\]: colour"):
        parse_run_config(text)


@pytest.mark.parametrize("text, message", [
    ("[run\n", "not valid TOML"),
    ('[run]\nid = "x"\nseed = 1\n', "missing [task] name"),
    ('[run]\nid = "x"\nseed = true\n', "[run] seed must be a int"),
])
def test_bad_run_config_rejected(text, message):
    with pytest.raises(UserError) as raised:
        parse_run_config(text)
    assert message in str(raised.value)


def test_missing_run_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")


def test_config_hash_follows_text():
    text = DIGITS_RUN.read_text()
    assert parse_run_config(text).config_hash == parse_run_config(text).config_hash
    assert parse_run_config(text).config_hash != parse_run_config(text + "# edited\n").config_hash
    assert parse_run_config(text).config_hash != parse_run_config(text.replace("seed = 20261128", "seed = 1")).config_hash


# --- ledger --------------------------------------------------------------------------------------

@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


KEY = Ed25519PrivateKey.generate()


def admit(ledger: Ledger, org: str, peer_id: str):
    """Add `org` if new, issue a token and admit `peer_id` with it, as the Join handler does."""
    if org not in [o["name"] for o in ledger.orgs()]:
        ledger.add_org(org)
    token, _ = tokens.issue(ledger, KEY, "run", org, 3600, 0)
    claims = tokens.decode(token, KEY.public_key().public_bytes_raw())
    return ledger.admit(claims, peer_id, bytes(32), f"Qm{peer_id}", "cpu")


def report(ledger, admission, report_id, epoch=0, samples=100, loss=1.5) -> bool:
    return ledger.record_report(admission.peer_id, admission.session, report_id, epoch, samples, loss, 2.0,
                                {"accuracy": 0.5})


def test_issue_token_and_admit(ledger):
    admission = admit(ledger, "lab", "p-1")
    assert admission.org == "lab" and admission.peer_id == "p-1" and admission.session
    peers = ledger.snapshot(60)["peers"]
    assert [(p["id"], p["org"]) for p in peers] == [("p-1", "lab")]


def test_report_is_idempotent(ledger):
    admission = admit(ledger, "lab", "p-1")
    assert report(ledger, admission, "r1") is True
    samples = ledger.snapshot(60)["samples"]
    assert samples == 100
    assert report(ledger, admission, "r1") is False
    assert ledger.report_ids() == {"r1"}
    assert ledger.snapshot(60)["samples"] == samples
    assert ledger.snapshot(60)["peers"][0]["reports"] == 1


def test_same_epoch_other_report_id_refused(ledger):
    admission = admit(ledger, "lab", "p-1")
    report(ledger, admission, "r1", epoch=2)
    with pytest.raises(LedgerError) as raised:
        report(ledger, admission, "r2", epoch=2)
    assert raised.value.code == "ALREADY_EXISTS"
    assert ledger.report_ids() == {"r1"}


def test_report_with_wrong_session_refused(ledger):
    admission = admit(ledger, "lab", "p-1")
    with pytest.raises(LedgerError) as raised:
        ledger.record_report("p-1", "not-the-session", "r1", 0, 100, 1.0, 1.0, {})
    assert raised.value.code == "UNAUTHENTICATED"
    with pytest.raises(LedgerError):
        ledger.record_report("p-unknown", admission.session, "r2", 0, 100, 1.0, 1.0, {})
    assert ledger.report_ids() == set()


def test_acknowledged_report_survives_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    first = Ledger(path)
    admission = admit(first, "lab", "p-1")
    assert report(first, admission, "r1", samples=123)
    first.close()

    # read the file with plain sqlite too: the row is really on disk, not only in a cache
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT samples FROM reports WHERE report_id='r1'").fetchone() == (123,)
    second = Ledger(path)
    try:
        assert second.report_ids() == {"r1"}
        state = second.snapshot(60)
        assert state["samples"] == 123
        assert [(o["name"], o["samples"]) for o in state["orgs"]] == [("lab", 123)]
        assert report(second, admission, "r1", samples=123) is False  # the session survives too
    finally:
        second.close()


def test_snapshot_sums_per_org(ledger):
    a1, a2, b1 = admit(ledger, "alpha", "p-a1"), admit(ledger, "alpha", "p-a2"), admit(ledger, "beta", "p-b1")
    report(ledger, a1, "a1-0", epoch=0, samples=100)
    report(ledger, a1, "a1-1", epoch=1, samples=60)
    report(ledger, a2, "a2-0", epoch=0, samples=50)
    report(ledger, b1, "b1-0", epoch=0, samples=30)
    ledger.add_org("gamma")  # an org without peers

    state = ledger.snapshot(60)
    assert state["samples"] == 240
    assert state["orgs"] == [
        {"name": "alpha", "samples": 210, "peers": 2},
        {"name": "beta", "samples": 30, "peers": 1},
        {"name": "gamma", "samples": 0, "peers": 0},
    ]
    per_peer = {p["id"]: (p["samples"], p["reports"]) for p in state["peers"]}
    assert per_peer == {"p-a1": (160, 2), "p-a2": (50, 1), "p-b1": (30, 1)}


# --- task loading --------------------------------------------------------------------------------

def test_load_task_missing_module():
    with pytest.raises(UserError, match="not installed") as raised:
        load_task("potluck_no_such_task", "1")
    assert "potluck_no_such_task" in str(raised.value)


def test_load_task_version_mismatch():
    with pytest.raises(UserError, match="version") as raised:
        load_task("examples.digits", "999")
    assert "999" in str(raised.value)


def test_load_task_matching_version():
    task = load_task("examples.digits", "1")
    assert task.name == "examples.digits"


def test_plain_progress_line_before_any_loss_is_known(capsys):
    """A DiLoCo round can end before this peer reported anything: the line says so instead of crashing."""
    from peer.progress import Progress, ProgressDisplay

    with ProgressDisplay("p-1", "run", mode="plain") as display:
        display.epoch_done(Progress(epoch=3))
    assert "epoch 3 loss -" in capsys.readouterr().out


def test_a_snapshot_read_does_not_see_commits_made_during_it(tmp_path):
    """`coordinator ledger verify` reads several tables while serve and the auditor commit: in one
    snapshot (coordinator/books/store.py), or a settlement committed between two reads looks tampered."""
    import sqlite3

    from coordinator.books.store import SqliteStore

    store = SqliteStore(tmp_path / "s.sqlite")
    store._db.execute("CREATE TABLE t (x INTEGER)")
    other = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
    with store._snapshot() as db:
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
        other.execute("INSERT INTO t VALUES (1)")  # another process commits meanwhile
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    assert store._read("SELECT COUNT(*) FROM t")[0][0] == 1
    other.close()
    store.close()


def test_the_coordinators_processes_share_tensors_without_torchs_shm_manager():
    """hivemind's default ("file_system") needs a torch_shm_manager helper per process, whose handshake
    was seen spinning forever holding the GIL in an auditor: serve, the auditor and the observer pick
    file descriptors first thing, whether hivemind was imported before or not."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "HIVEMIND_MEMORY_SHARING_STRATEGY"}
    for first in ("", "import hivemind; "):
        out = subprocess.run([sys.executable, "-c", first + "from coordinator.tensor_sharing import "
                              "share_tensors_by_file_descriptor as s; s(); import hivemind, os, torch.multiprocessing"
                              " as m; print(m.get_sharing_strategy(), os.environ['HIVEMIND_MEMORY_SHARING_STRATEGY'])"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.stdout.split() == ["file_descriptor", "file_descriptor"], (first, out.stderr[-2000:])
