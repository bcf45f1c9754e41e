"""The books' one schema (coordinator/books/schema.py): ledger files from before versioning are upgraded
in place, a file from a newer potluck is refused, and no module outside the books holds SQL."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from conftest import cli
from coordinator import tokens
from coordinator.books import contribution_log, schema
from coordinator.books.ledger import LEDGER_FILE, Ledger
from peer.errors import UserError
from peer.identity import load_or_create_identity
from peer.report import canonical_bytes

ROOT = Path(__file__).resolve().parent.parent


def _file_from_before_versioning(path: Path, steps: int, credit_tables: bool = True) -> None:
    """A ledger as potluck wrote it before schema versions: the tables its stores created (step 1's frozen
    text, and step 2 where the credit store had run), user_version 0, with a run's facts in it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    scripts = [schema._LEDGER_V1] + ([schema._CREDIT_V1, schema._CONTRIBUTION_LOG_V1] if credit_tables else [])
    for script in scripts:
        for statement in schema.statements(script):
            db.execute(statement)
    if steps >= 2:
        schema._micro_batches_per_report(db)
    db.execute("INSERT INTO meta VALUES ('run_id', 'old-run')")
    if credit_tables:  # one report as the credit store kept it: its row and its signed log entry
        report = {"report_id": "r-0", "peer_id": "p-1", "epoch": 0, "samples": 96,
                  "sketches": [{"index": 0}, {"index": 1}, {"index": 2}]}
        signer = load_or_create_identity(path.parent, "p-1.key")
        contribution_log.append(db, "report", "p-1", {
            "report": report, "signature": signer.private_key.sign(canonical_bytes(report)).hex(),
            "public_key": signer.public_bytes.hex()})
        body = json.dumps(report)
        columns = "report_id, peer_id, epoch, samples, credited_samples, body, flags, median_norm, " \
                  "samples_per_second, received"
        db.execute(f"INSERT INTO credit_reports ({columns}) VALUES ('r-0', 'p-1', 0, 96, 96, ?, '{{}}', 1.0, 5.0, 1.0)",
                   (body,))
        if steps >= 2:  # the credit store counted them when it stored the report
            db.execute("UPDATE credit_reports SET micro_batches = 3")
        contribution_log.append(db, "settle", "p-1", {"window": 0, "samples": 0, "status": "forfeited"})
    db.execute("COMMIT")
    assert schema.version(db) == 0
    db.close()


@pytest.mark.parametrize("steps, credit_tables", [(2, True), (1, True), (1, False)],
                         ids=["served", "credit-before-micro-batches", "ledger-only"])
def test_a_ledger_from_before_versioning_is_upgraded_in_place(tmp_path, steps, credit_tables):
    path = tmp_path / LEDGER_FILE
    _file_from_before_versioning(path, steps, credit_tables)
    ledger = Ledger(path)
    assert ledger._read("PRAGMA user_version")[0][0] == len(schema.LEDGER)
    assert ledger.meta("run_id") == "old-run"
    indexes = {row["name"] for row in ledger._read("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "credit_reports_peer" in indexes
    if credit_tables:  # the facts are kept, the new column filled in from each report's body
        assert [tuple(row) for row in ledger._read("SELECT report_id, micro_batches FROM credit_reports")] == \
               [("r-0", 3)]
    else:  # the tables the credit store would have created are there now
        assert ledger._read("SELECT COUNT(*) FROM settlements")[0][0] == 0
    # the new file works: a token, a peer and a report
    signer = load_or_create_identity(tmp_path, "coordinator.key")
    ledger.add_org("acme")
    token, _ = tokens.issue(ledger, signer.private_key, "old-run", "acme", 3600, 0)
    admission = ledger.admit(tokens.decode(token, signer.public_bytes), "p-2", b"k" * 32, "hm-2", "cpu")
    assert ledger.record_report("p-2", admission.session, "r-1", 0, 32, 1.0, 1.0, {})
    assert ledger.accounts("p-2")["p-2"].credit_pending == 32
    ledger.close()
    Ledger(path).close()  # opening it again changes nothing
    verify = cli("coordinator", "ledger", "verify", "--data-dir", str(tmp_path))
    assert verify.returncode == 0 and "contribution log intact" in verify.stdout, verify.stdout + verify.stderr


def test_a_ledger_from_a_newer_potluck_is_refused(tmp_path):
    path = tmp_path / LEDGER_FILE
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(schema.LEDGER) + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="newer potluck; upgrade potluck"):
        Ledger(path)
    result = cli("coordinator", "status", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "upgrade potluck" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert path.read_bytes() == before


def test_a_ledger_of_unsigned_tokens_is_refused(tmp_path):
    path = tmp_path / LEDGER_FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE tokens (id TEXT PRIMARY KEY, org TEXT NOT NULL, created REAL NOT NULL)")
    db.close()
    with pytest.raises(UserError, match="older potluck"):
        Ledger(path)
    db = sqlite3.connect(path)
    assert schema.version(db) == 0 and db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0] == 1
    db.close()


def test_processes_opening_a_new_file_at_once_migrate_it_once(tmp_path):
    """serve, the auditor and the CLIs open one file: the first applies the steps, the others wait for
    its transaction and find them done."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / LEDGER_FILE
    with ThreadPoolExecutor(4) as pool:
        ledgers = list(pool.map(lambda _: Ledger(path), range(4)))
    for ledger in ledgers:
        assert ledger._read("PRAGMA user_version")[0][0] == len(schema.LEDGER)
        ledger.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='lists_changes'").fetchall() == [("0",)]
    db.close()


def test_no_sql_outside_the_books():
    """Every table and statement belongs to coordinator/books/; the other modules call its methods."""
    sql = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE FROM|CREATE TABLE|PRAGMA)\b|\.query\(|\._read\(|\._db\b")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "coordinator").rglob("*.py")) if "books" not in path.parts
                 for number, line in enumerate(path.read_text().splitlines(), 1) if sql.search(line)]
    assert not offenders, "\n".join(offenders)
