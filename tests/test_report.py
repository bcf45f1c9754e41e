"""`coordinator report --org`: statements in csv, json and png from a real ledger file, and its errors."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest

from conftest import cli
from coordinator import tokens
from coordinator.books.ledger import LEDGER_FILE, Ledger
from peer.identity import load_or_create_identity


@pytest.fixture
def data_dir(tmp_path):
    """A ledger with two orgs: acme has two peers (3 epochs of 100 and 50 samples), beta one (3 x 50)."""
    ledger = Ledger(tmp_path / LEDGER_FILE)
    ledger.bind_run("report-run", "0" * 64)
    signer = load_or_create_identity(tmp_path, "coordinator.key")
    peers = []
    for org, name, device in (("acme", "a1", "cuda:0"), ("acme", "a2", "cpu"), ("beta", "b1", "cpu")):
        if org not in {o["name"] for o in ledger.orgs()}:
            ledger.add_org(org)
        token, _ = tokens.issue(ledger, signer.private_key, "report-run", org, 3600, 0)
        claims = tokens.decode(token, signer.public_bytes)
        peer_id = f"p-{name}"
        admission = ledger.admit(claims, peer_id, bytes([len(peers)]) * 32, f"hm-{name}", device)
        peers.append((admission, 100 if name == "a1" else 50))
    for epoch in range(3):
        for admission, samples in peers:
            ledger.record_report(admission.peer_id, admission.session, f"{admission.peer_id}-{epoch}", epoch,
                                 samples, 1.0, 360.0, {"accuracy": 0.5})
    ledger.close()
    return tmp_path


def report(data_dir, *args, timeout=60):
    return cli("coordinator", "report", "--data-dir", str(data_dir), *args, timeout=timeout)


def test_json_statement_counts_the_orgs_peers_and_share(data_dir):
    result = report(data_dir, "--org", "acme")
    assert result.returncode == 0, result.stderr
    statement = json.loads(result.stdout)
    assert statement["run_id"] == "report-run" and statement["credit_basis"].startswith("reported samples")
    assert [(p["peer_id"], p["samples"], p["device"]) for p in statement["peers"]] == [
        ("p-a1", 300, "cuda:0"), ("p-a2", 150, "cpu")]
    totals = statement["totals"]
    assert totals["samples"] == 450 and totals["run_samples"] == 600
    assert totals["share_of_run"] == pytest.approx(0.75)
    assert totals["device_hours"] == pytest.approx(6 * 360 / 3600)
    assert statement["timeline"]["org_samples"] == [150, 150, 150]


def test_csv_and_since(data_dir):
    result = report(data_dir, "--org", "beta", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["peer_id"] for row in rows] == ["p-b1", "TOTAL"]
    assert rows[-1]["samples"] == "150" and float(rows[-1]["share_of_run"]) == pytest.approx(0.25)
    # nothing was reported after a day far in the future; everything after one long past
    future = json.loads(report(data_dir, "--org", "beta", "--since", "2999-01-01").stdout)
    assert future["totals"]["samples"] == 0 and future["since"].startswith("2999-01-01")
    past = json.loads(report(data_dir, "--org", "beta", "--since", "2000-01-01T00:00").stdout)
    assert past["totals"]["samples"] == 150


def test_png_plots_the_contribution(data_dir, tmp_path):
    out = tmp_path / "acme.png"
    result = report(data_dir, "--org", "acme", "--format", "png", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def _settle(data_dir, *rows):
    """Settlement rows (peer, window, samples, status) as the auditor's Credit.settle writes them."""
    db = sqlite3.connect(data_dir / LEDGER_FILE)
    db.executemany("INSERT INTO settlements VALUES (?, ?, ?, 0.0, ?, 1.0)", rows)
    db.commit()
    db.close()


def test_credit_is_pending_until_a_window_settles(data_dir):
    """The accounts on the real tables: before any window settles, each peer's reported samples are
    pending credit, not verified (it used to show credit 0, verified); a checked report counts its
    credited samples (0 after a failed cheap check) instead of its claim."""
    ledger = Ledger.open_existing(data_dir)
    books = ledger.accounts()
    assert {peer: (a.credit, a.credit_pending, a.credit_settled, a.credit_verified) for peer, a in books.items()} == {
        "p-a1": (300.0, 300.0, 0.0, False), "p-a2": (150.0, 150.0, 0.0, False), "p-b1": (150.0, 150.0, 0.0, False)}
    assert books["p-a1"].audit_status == "not audited"
    with ledger._write() as db:  # p-b1's epoch-0 report failed a cheap check in the credit store
        db.execute("INSERT INTO credit_reports (report_id, peer_id, epoch, samples, credited_samples, body, flags, "
                   "median_norm, samples_per_second, received) VALUES ('p-b1-0', 'p-b1', 0, 50, 0, '{}', '{}', 0, 0, 1)")
        db.execute("INSERT INTO audits (report_id, peer_id, epoch, micro_batch, verdict, reason, at) "
                   "VALUES ('p-b1-0', 'p-b1', 0, -1, 'fail', 'a cheap check', 1.0)")
    assert ledger.accounts("p-b1") == {"p-b1": ledger.accounts()["p-b1"]}
    b1 = ledger.accounts("p-b1")["p-b1"]
    assert (b1.credit_pending, b1.audits_failed, b1.audit_status) == (100.0, 1, "1 failed")
    ledger.close()
    statement = json.loads(report(data_dir, "--org", "acme").stdout)
    assert statement["credit_basis"].startswith("reported samples")
    assert [(p["credit"], p["credit_verified"]) for p in statement["peers"]] == [(300.0, False), (150.0, False)]
    status = cli("coordinator", "status", "--data-dir", str(data_dir), "--format", "json")
    assert status.returncode == 0, status.stderr
    assert {p["id"]: (p["credit"], p["credit_verified"]) for p in json.loads(status.stdout)["peers"]} == {
        "p-a1": (300.0, False), "p-a2": (150.0, False), "p-b1": (100.0, False)}


def test_settled_and_pending_credit_after_windows_settle(data_dir):
    """Windows of 2 epochs: a settled window turns its samples into settled credit, a forfeited one into
    nothing; what is left open stays pending, and an account is verified once nothing is pending."""
    ledger = Ledger.open_existing(data_dir)
    with ledger._write() as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('verification', '{\"window_epochs\": 2}')")
    ledger.close()
    _settle(data_dir, ("p-a1", 0, 200, "settled"), ("p-b1", 0, 0, "forfeited"))
    ledger = Ledger.open_existing(data_dir)
    books = ledger.accounts()
    assert {peer: (a.credit, a.credit_settled, a.credit_pending, a.credit_verified) for peer, a in books.items()} == {
        "p-a1": (300.0, 200.0, 100.0, False), "p-a2": (150.0, 0.0, 150.0, False), "p-b1": (50.0, 0.0, 50.0, False)}
    statement = json.loads(report(data_dir, "--org", "acme").stdout)
    assert statement["credit_basis"].startswith("settled and pending")
    assert statement["totals"]["share_of_run"] == pytest.approx(450 / 500)
    _settle(data_dir, ("p-a1", 1, 100, "settled"), ("p-a2", 0, 100, "settled"), ("p-a2", 1, 50, "settled"),
            ("p-b1", 1, 50, "settled"))
    books = ledger.accounts()
    assert all(a.credit_verified and not a.credit_pending for a in books.values())
    assert {peer: a.credit for peer, a in books.items()} == {"p-a1": 300.0, "p-a2": 150.0, "p-b1": 50.0}
    ledger.close()
    statement = json.loads(report(data_dir, "--org", "acme").stdout)
    assert statement["credit_basis"].startswith("verified")
    assert statement["totals"]["share_of_run"] == pytest.approx(450 / 500)


@pytest.mark.parametrize("args, message", [
    (("--org", "nobody"), "unknown org 'nobody'; orgs in this run: acme, beta"),
    (("--org", "acme", "--since", "last tuesday"), "invalid --since 'last tuesday'"),
    (("--org", "acme", "--format", "png"), "--format png needs --out"),
])
def test_bad_input_is_one_error_line(data_dir, args, message):
    result = report(data_dir, *args)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


def test_bad_format_and_missing_ledger(data_dir, tmp_path):
    result = report(data_dir, "--org", "acme", "--format", "xlsx")
    assert result.returncode == 2 and "xlsx" in result.stderr and "Traceback" not in result.stderr
    result = report(tmp_path / "nothing", "--org", "acme")
    assert result.returncode == 2 and result.stderr.startswith("error: no coordinator ledger")
