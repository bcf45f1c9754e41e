"""`coordinator report --org`: statements in csv, json and png from a real ledger file, and its errors."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest

from conftest import cli
from coordinator import tokens
from coordinator.books.accounting import accounts
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


def test_verified_credit_and_audits_when_the_verification_tables_exist(data_dir):
    db = sqlite3.connect(data_dir / LEDGER_FILE)
    db.execute("CREATE TABLE credit (peer_id TEXT, epoch INTEGER, verified_samples INTEGER)")
    db.execute("CREATE TABLE audits (peer_id TEXT, epoch INTEGER, verdict TEXT, created REAL)")
    db.executemany("INSERT INTO credit VALUES (?, ?, ?)", [("p-a1", 0, 100), ("p-a1", 1, 100), ("p-b1", 0, 50)])
    db.executemany("INSERT INTO audits VALUES (?, ?, ?, ?)",
                   [("p-a1", 0, "pass", 1.0), ("p-a1", 1, "pass", 2.0), ("p-b1", 0, "fail", 3.0)])
    db.commit()
    db.close()
    statement = json.loads(report(data_dir, "--org", "acme").stdout)
    assert statement["credit_basis"].startswith("verified")
    assert {p["peer_id"]: (p["credit"], p["audits_passed"]) for p in statement["peers"]} == {
        "p-a1": (200.0, 2), "p-a2": (0.0, 0)}
    assert statement["totals"]["share_of_run"] == pytest.approx(200 / 250)
    books = accounts(Ledger.open_existing(data_dir).query)
    assert books["p-b1"].audit_status == "1 failed" and books["p-a2"].audit_status == "not audited"


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
