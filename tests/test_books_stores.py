"""The Books suite, run against both stores (as Flower's state tests run one suite on each of its states):
the same calls and the same assertions on the embedded sqlite file and on a real PostgreSQL server
(tests/postgres.py starts one per session; without its binaries the PostgreSQL half skips).

join, heartbeat, reports and the run's epoch; the credit tables' cheap checks, audits, strikes, a ban and
settlement; the contribution log's verification and its append-only rule; the nonces; the migrations.
"""

from __future__ import annotations

import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent))

from postgres import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)
from coordinator import tokens  # noqa: E402
from coordinator.books import contribution_log, reports, schema, views  # noqa: E402
from coordinator.books import credit as credit_module  # noqa: E402
from coordinator.books.binding import Binding  # noqa: E402
from coordinator.books.credit import FAIL, PASS, Credit  # noqa: E402
from coordinator.books.ledger import BANNED, LEDGER_FILE, Ledger, LedgerError  # noqa: E402
from coordinator.books.nonces import NONCE_FILE, NonceStore  # noqa: E402
from coordinator.books.run_epoch import EpochRule  # noqa: E402
from peer.errors import UserError  # noqa: E402
from peer.identity import load_or_create_identity  # noqa: E402
from peer.report import sign_report  # noqa: E402
from peer.runconfig import VerificationConfig  # noqa: E402
from protos import coordinator_pb2 as pb  # noqa: E402

RUN = "books-run"
KEY = Ed25519PrivateKey.generate()
VERIFY = VerificationConfig(window_epochs=2, audit_floor=1, detection_confidence=0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Where the books live: a sqlite file's path or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / LEDGER_FILE
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def ledger(store):
    ledger = Ledger(store, EpochRule(min_peers=1, peer_timeout=60.0, slack=3))
    ledger.bind_run(RUN, "hash")
    yield ledger
    ledger.close()


def _admit(ledger: Ledger, org: str, peer_id: str, public_key: bytes = bytes(32), max_peers: int = 0):
    if org not in [o["name"] for o in ledger.orgs()]:
        ledger.add_org(org)
    token, _ = tokens.issue(ledger, KEY, RUN, org, 3600, max_peers)
    claims = tokens.decode(token, KEY.public_key().public_bytes_raw())
    return ledger.admit(claims, peer_id, public_key, f"Qm{peer_id}", "cpu"), claims


def _set_version(store, number: int) -> None:
    """What a newer potluck leaves behind: a schema version above this code's."""
    if isinstance(store, Path):
        import sqlite3

        db = sqlite3.connect(store)
        db.execute(f"PRAGMA user_version = {number}")
        db.close()
    else:
        import psycopg

        with psycopg.connect(store, autocommit=True) as conn:
            conn.execute("UPDATE schema_versions SET version = %s WHERE name = 'ledger'", (number,))


def test_a_new_store_is_migrated_once_by_processes_opening_it_at_once(store):
    with ThreadPoolExecutor(4) as pool:
        ledgers = list(pool.map(lambda _: Ledger(store), range(4)))
    for ledger in ledgers:
        assert ledger._conn.version(schema.LEDGER.name) == len(schema.LEDGER)
    assert ledgers[0].meta("lists_changes") == "0"
    for ledger in ledgers:
        ledger.close()
    again = Ledger(store)  # reopening applies nothing
    assert again._conn.version(schema.LEDGER.name) == len(schema.LEDGER)
    again.close()


def test_a_store_from_a_newer_potluck_is_refused(store):
    Ledger(store).close()
    _set_version(store, len(schema.LEDGER) + 1)
    with pytest.raises(UserError, match="newer potluck; upgrade potluck"):
        Ledger(store)


def test_join_heartbeat_report_and_the_run_epoch(ledger):
    first, _ = _admit(ledger, "lab", "p-1")
    second, _ = _admit(ledger, "lab", "p-2")
    version, allowed, denied = ledger.swarm_lists()
    assert allowed == ["Qmp-1", "Qmp-2"] and denied == []
    assert ledger.heartbeat("p-1", first.session, 0, 12.5)["peer_id"] == "p-1"
    with pytest.raises(LedgerError) as refused:
        ledger.heartbeat("p-1", "not-the-session", 0, 1.0)
    assert refused.value.code == "UNAUTHENTICATED"

    assert ledger.record_report("p-1", first.session, "r-1", 0, 100, 2.0, 1.0, {"accuracy": 0.5})
    assert not ledger.record_report("p-1", first.session, "r-1", 0, 100, 2.0, 1.0, {})  # idempotent on its id
    with pytest.raises(LedgerError, match="already reported epoch 0"):
        ledger.record_report("p-1", first.session, "r-other", 0, 100, 2.0, 1.0, {})
    assert ledger.run_epoch() == 1  # the only voter (a peer votes once it reported)
    assert ledger.record_report("p-2", second.session, "r-2", 0, 50, 1.0, 1.0, {"accuracy": 0.7})
    assert ledger.record_report("p-1", first.session, "r-3", 1, 0, 2.0, 1.0, {})
    assert ledger.run_epoch() == 1  # one of two voters at epoch 1: no majority
    assert ledger.reported_samples("p-1") == 100 and ledger.report_ids() == {"r-1", "r-2", "r-3"}

    state = ledger.snapshot(60.0)
    assert state["run_id"] == RUN and state["epoch"] == 1 and state["samples"] == 150
    assert state["loss"] == 0.0  # the last epoch's, sample-weighted: no samples in it
    assert [(p["id"], p["samples"], p["reports"], p["alive"]) for p in state["peers"]] == [
        ("p-1", 100, 2, True), ("p-2", 50, 1, True)]
    assert state["orgs"] == [{"name": "lab", "samples": 150, "peers": 2}]
    assert ledger.summarize(60.0).live_peers == 2
    totals = views.epoch_totals(ledger, 5)
    assert [(t["epoch"], t["samples"]) for t in totals] == [(0, 150), (1, 0)]
    assert totals[0]["accuracy"] == pytest.approx(0.6) and totals[0]["loss"] == pytest.approx(250 / 150)
    assert [(p["peer_id"], p["samples"]) for p in views.org_peers(ledger, "lab", 0.0)] == [("p-1", 100), ("p-2", 50)]
    assert views.run_samples(ledger) == 150 and views.org_names(ledger) == ["lab"]

    accounts = ledger.accounts()  # before any window settles: reported samples are pending, not verified
    assert accounts["p-1"].credit_pending == 100 and not accounts["p-1"].credit_verified
    assert ledger.accounts("p-2")["p-2"].credit == 50

    for epoch in (5, 5, 6):  # past run epoch + slack, no jump: refused for now, remembered as its claim
        verdict = ledger.judge_report_epoch("p-1", epoch)
        assert verdict.refused and not verdict.evidence
    assert ledger.judge_report_epoch("p-1", 12).evidence  # a jump past its claim, the run and the swarm

    assert ledger.evict("p-2", f"{BANNED}: test")
    version_after, allowed, denied = ledger.swarm_lists()
    assert version_after != version and allowed == ["Qmp-1"] and denied == ["Qmp-2"]
    with pytest.raises(LedgerError) as evicted:
        ledger.heartbeat("p-2", second.session, 1, 1.0)
    assert evicted.value.code == "PERMISSION_DENIED"
    ledger.leave("p-1", first.session)
    assert not ledger.others_alive("p-2", 60.0)


def test_tokens_and_org_quotas(ledger):
    _, claims = _admit(ledger, "acme", "p-1", max_peers=1)
    with pytest.raises(LedgerError, match="already used by 1 other peer identity"):
        ledger.admit(claims, "p-2", bytes(32), "Qmp-2", "cpu")
    assert [(t["org"], t["peers"], t["revoked"]) for t in ledger.tokens()] == [("acme", 1, False)]
    assert ledger.revoke_token(claims.id) == 1
    with pytest.raises(LedgerError, match="revoked"):
        ledger.admit(claims, "p-1", bytes(32), "Qmp-1", "cpu")
    ledger.add_org("quota", max_peers=1)
    _admit(ledger, "quota", "q-1")
    with pytest.raises(LedgerError, match="its quota"):
        _admit(ledger, "quota", "q-2")
    assert ledger.remove_org("quota") == 1
    assert {o["name"]: o["removed"] for o in ledger.orgs()} == {"acme": False, "quota": True}


class Peers:
    """Signed reports with sketches of the run's size (the cheap checks need nothing more)."""

    def __init__(self, ledger: Ledger, folder: Path):
        self.ledger, self.folder, self.ids = ledger, folder, {}
        self.rng = random.Random(3)

    def join(self, name: str, org: str = "lab"):
        identity = load_or_create_identity(self.folder / name)
        admission, _ = _admit(self.ledger, org, identity.peer_id, identity.public_bytes)
        self.ids[name] = (identity, admission)
        return identity

    def report(self, name: str, epoch: int, micro_batches: int = 2, repeat_of: pb.ReportRequest | None = None,
               in_ledger: bool = True):
        """A signed report; ``in_ledger``: its raw row recorded already (as the credit tests need)."""
        identity, admission = self.ids[name]
        request = pb.ReportRequest(peer_id=identity.peer_id, session=admission.session, report_id=f"{name}-{epoch}",
                                   epoch=epoch,
                                   samples=8 * micro_batches, loss=1.0, compute_seconds=0.5, compute_dtype="fp32")
        request.parameters.norm = 1.0
        request.parameters.projection.extend([self.rng.random() for _ in range(VERIFY.sketch_dims)])
        for index in range(micro_batches):
            projection = list(repeat_of.sketches[index].projection) if repeat_of else \
                [self.rng.random() for _ in range(VERIFY.sketch_dims)]
            request.sketches.add(index=index, samples=8, norm=1.0, projection=projection)
        sign_report(request, RUN, identity.private_key)
        if in_ledger:
            self.ledger.record_report(identity.peer_id, admission.session, request.report_id, epoch, request.samples,
                                      1.0, 0.5, {})
        return request


@pytest.fixture
def credit(ledger):
    credit = Credit(ledger.target, VERIFY, RUN, flops_per_sample=2.0)
    credit.on_ban = lambda peer_id, reason: ledger.note_eviction()  # as serve wires it: the ban evicts itself
    yield credit
    credit.close()


def test_reports_audits_settlement_and_a_verified_log(ledger, credit, tmp_path):
    peers = Peers(ledger, tmp_path)
    honest = peers.join("honest")
    credit.use_binding(Binding(parameter_count=1000, micro_batch_size=8, sketch_dims=VERIFY.sketch_dims,
                               compression="none", epoch_slack=3))
    peers.join("other")
    for epoch in range(3):
        request = peers.report("honest", epoch)
        request.attestations.add(role="sent", kind="grad", group=f"g{epoch}", epoch=epoch, sender=f"Qm{honest.peer_id}",
                                 reducer=f"Qm{peers.ids['other'][0].peer_id}", length=500,
                                 sketch=[0.5] * VERIFY.sketch_dims, norm_sq=1.0)
        sign_report(request, RUN, honest.private_key)
        assert credit.signature_ok(request, honest.public_bytes)
        admitted = credit.record_report(request, honest.public_bytes, micro_batch_size=8)
        assert admitted.fresh and admitted.problems == []
        assert not credit.record_report(request, honest.public_bytes, 8).fresh
    assert credit.run_epoch() == 3 and credit.next_epoch_of(honest.peer_id) == 3
    assert [row["report_id"] for row in credit.reports_to_audit()] == ["honest-0", "honest-1", "honest-2"]
    for row in credit.reports_to_audit():
        credit.mark_report(row["report_id"], "done")
        credit.record_audit(row["report_id"], honest.peer_id, row["epoch"], 0, PASS, 1e-5, 1.0, "")
    assert credit.passed_audits(honest.peer_id) == 3
    assert credit.settle(credit.run_epoch()) == 1  # window 0 (epochs 0-1) closed; window 1 still open
    windows = credit.windows()[honest.peer_id]
    assert [(w["window"], w["state"], w["samples"]) for w in windows] == [(0, "settled", 32), (1, "open", 16)]
    account = ledger.accounts(honest.peer_id)[honest.peer_id]
    assert (account.credit_settled, account.credit_pending, account.audits_passed) == (32, 16, 3)
    row = {r["peer"]: r for r in credit.peer_rows()}[honest.peer_id]
    assert row["samples_settled"] == 32 and row["flops_settled"] == 64.0 and not row["banned"]
    assert credit.verify() == []
    with pytest.raises(Exception, match="append-only"):
        with credit._write() as db:
            db.execute("UPDATE contribution_log SET kind = 'forged' WHERE seq = 1")
    assert credit.verify() == []


def test_a_copied_sketch_and_failed_audits_ban_the_peer(ledger, credit, tmp_path):
    peers = Peers(ledger, tmp_path)
    honest, cheater = peers.join("honest"), peers.join("cheater", org="acme")
    original = peers.report("honest", 0)
    credit.record_report(original, honest.public_bytes, 8)
    copy = peers.report("cheater", 0, repeat_of=original)
    admitted = credit.record_report(copy, cheater.public_bytes, 8)
    assert admitted.fresh and any("repeats the sketch" in p for p in admitted.problems)
    assert credit.banned_reason(cheater.peer_id) is None  # one failure: no strike yet
    credit.record_audit("cheater-0", cheater.peer_id, 0, 1, FAIL, 0.9, 3.0, "replay differs")
    assert credit.banned_reason(cheater.peer_id).startswith("1 strike(s)")
    assert not credit.ban(cheater.peer_id, "again")  # already banned
    assert ledger.org_strikes() == {"acme": 1} and credit.org_strikes() == {"acme": 1}
    account = ledger.accounts(cheater.peer_id)[cheater.peer_id]
    assert account.banned and account.credit_pending == 0 and account.audits_failed >= 2
    assert [b["peer_id"] for b in ledger.recent_bans()] == [cheater.peer_id]
    assert ledger.swarm_lists()[2] == [f"Qm{cheater.peer_id}"]  # evicted in the ban's transaction
    assert all(t["revoked"] for t in ledger.tokens() if t["org"] == "acme")
    assert not any(w["state"] == "settled" for w in credit.windows().get(cheater.peer_id, []))
    assert credit.audit_rows()[-1]["verdict"] == FAIL
    assert credit.verify() == []


def test_nonces_are_seen_once(store, tmp_path):
    target = tmp_path / NONCE_FILE if isinstance(store, Path) else store
    nonces = NonceStore(target, window=60.0)
    now = time.time()
    assert nonces.add(b"key", "n-1", now) and not nonces.add(b"key", "n-1", now) and nonces.add(b"key", "n-2", now)
    nonces.close()
    again = NonceStore(target, window=60.0)  # remembered across a restart
    assert not again.add(b"key", "n-1", now)
    again.close()


# --- the CLI's --store: every command that opens the books takes it --------------------------------

BAD_URLS = ["mysql://u@127.0.0.1:5432/books", "postgresql://u@127.0.0.1:99999/books", "postgresql:///books",
            "postgresql://u@127.0.0.1:1/books"]  # wrong scheme, bad port, no host, nobody listening


@pytest.mark.parametrize("url", BAD_URLS, ids=["scheme", "port", "no-host", "unreachable"])
def test_a_bad_or_unreachable_store_is_one_error_line_and_changes_nothing(tmp_path, url):
    from conftest import cli, write_run

    run = write_run(tmp_path / "run.toml")
    data_dir = tmp_path / "c"
    for command in (["status"], ["org", "list"], ["ledger", "verify"], ["report", "--org", "lab"],
                    ["serve", "--run", str(run), "--port", "0", "--no-dashboard"]):
        result = cli("coordinator", *command, "--data-dir", str(data_dir), "--store", url)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not data_dir.exists()


def test_the_cli_reads_and_writes_the_books_in_postgresql(postgres_server, postgres_url, tmp_path):
    import json

    import psycopg
    from conftest import cli

    fresh = postgres_server.create_database()  # nothing served there: refused, and left empty
    result = cli("coordinator", "status", "--store", fresh)
    assert result.returncode == 2 and "no coordinator ledger in" in result.stderr
    with psycopg.connect(fresh) as conn:
        assert conn.execute("SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0

    ledger = Ledger(postgres_url)  # what serve --store leaves: a bound run, a peer and its report
    ledger.bind_run(RUN, "hash")
    admission, _ = _admit(ledger, "lab", "p-1")
    ledger.record_report("p-1", admission.session, "r-1", 0, 64, 1.0, 2.0, {"accuracy": 0.9})
    ledger.close()
    store = ["--store", postgres_url, "--data-dir", str(tmp_path / "unused")]
    assert cli("coordinator", "org", "add", "acme", "--max-peers", "2", *store).returncode == 0
    orgs = json.loads(cli("coordinator", "org", "list", "--format", "json", *store).stdout)
    assert [(o["name"], o["max_peers"], o["peers"]) for o in orgs] == [("acme", 2, 0), ("lab", 0, 1)]
    state = json.loads(cli("coordinator", "status", "--format", "json", *store).stdout)
    assert state["run_id"] == RUN and state["samples"] == 64 and [p["id"] for p in state["peers"]] == ["p-1"]
    credit = json.loads(cli("coordinator", "ledger", "--format", "json", *store).stdout)
    assert credit == [] or all(row["samples_settled"] == 0 for row in credit)
    verified = cli("coordinator", "ledger", "verify", *store)
    assert verified.returncode == 0 and "intact" in verified.stdout
    report = json.loads(cli("coordinator", "report", "--org", "lab", *store).stdout)
    assert json.dumps(report) and "64" in json.dumps(report)
    assert not (tmp_path / "unused").exists()


def test_a_dropped_postgresql_connection_costs_one_call(postgres_url):
    """A server restart or a cut connection: the call that finds out fails, the next one reconnects;
    nothing of a transaction continues on the new connection."""
    import psycopg

    ledger = Ledger(postgres_url)
    ledger.bind_run(RUN, "hash")
    for read in (lambda: ledger.meta("run_id"), lambda: ledger.add_org("after")):
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            dropped = admin.execute("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                    "datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
        assert dropped >= 1  # the ledger's backend; a previous admin connection may still be listed
        with pytest.raises(psycopg.OperationalError):
            read()
        read()
    assert ledger.meta("run_id") == RUN and "after" in [o["name"] for o in ledger.orgs()]
    ledger.close()


def _log_length(credit: Credit) -> int:
    """Entries in the contribution log (no view lists them; the test reads the table)."""
    return credit._tuples("SELECT COUNT(*) FROM contribution_log")[0][0]


def test_a_report_is_one_transaction_nothing_of_it_stays_when_its_credit_half_fails(ledger, credit, tmp_path,
                                                                                     monkeypatch):
    peers = Peers(ledger, tmp_path)
    honest = peers.join("honest")
    request = peers.report("honest", 0, in_ledger=False)
    logged = _log_length(credit)

    def broken_append(db, kind, peer_id, body):  # the credit half fails after its rows were written
        raise RuntimeError("disk full")

    monkeypatch.setattr(contribution_log, "append", broken_append)
    with pytest.raises(RuntimeError, match="disk full"):
        reports.record(ledger, credit, request, honest.public_bytes, micro_batch_size=8)
    monkeypatch.undo()
    assert ledger.report_ids() == set() and credit.reports_to_audit() == []
    assert ledger.reported_samples(honest.peer_id) == 0 and credit.next_epoch_of(honest.peer_id) == 0
    assert _log_length(credit) == logged
    # the peer sends it again: accepted as new, and its sketches are not taken for a copy of the lost attempt
    recorded = reports.record(ledger, credit, request, honest.public_bytes, micro_batch_size=8)
    assert recorded.fresh and recorded.problems == []
    assert ledger.report_ids() == {"honest-0"} and [r["report_id"] for r in credit.reports_to_audit()] == ["honest-0"]
    assert not reports.record(ledger, credit, request, honest.public_bytes, micro_batch_size=8).fresh
    assert _log_length(credit) == logged + 1 and credit.verify() == []


def test_a_report_from_a_stale_session_writes_nothing(ledger, credit, tmp_path):
    peers = Peers(ledger, tmp_path)
    honest = peers.join("honest")
    request = peers.report("honest", 0, in_ledger=False)
    request.session = "not-the-session"
    with pytest.raises(LedgerError, match="unknown peer session"):
        reports.record(ledger, credit, request, honest.public_bytes, micro_batch_size=8)
    assert ledger.report_ids() == set() and credit.reports_to_audit() == []


def test_a_ban_and_its_eviction_commit_together(ledger, credit, tmp_path, monkeypatch):
    peers = Peers(ledger, tmp_path)
    cheater = peers.join("cheater", org="acme")
    session = peers.ids["cheater"][1].session
    reports.record(ledger, credit, peers.report("cheater", 0, in_ledger=False), cheater.public_bytes, 8)
    logged = _log_length(credit)

    def broken_evict(db, peer_id, reason):  # the eviction's write fails after the ban's rows were written
        raise RuntimeError("connection lost")

    monkeypatch.setattr(credit_module, "evict_peer", broken_evict)
    with pytest.raises(RuntimeError, match="connection lost"):
        credit.ban(cheater.peer_id, "operator decision")
    monkeypatch.undo()
    assert credit.banned_reason(cheater.peer_id) is None and ledger.recent_bans() == []
    assert ledger.authenticate(cheater.peer_id, session) == cheater.public_bytes  # not evicted either
    assert ledger.swarm_lists()[2] == [] and not any(t["revoked"] for t in ledger.tokens())
    assert ledger.org_strikes() == {} and _log_length(credit) == logged
    assert ledger.accounts(cheater.peer_id)[cheater.peer_id].credit_pending == 16  # nothing forfeited

    assert credit.ban(cheater.peer_id, "operator decision")
    assert credit.banned_reason(cheater.peer_id) == "operator decision"
    with pytest.raises(LedgerError, match=BANNED):
        ledger.authenticate(cheater.peer_id, session)
    assert ledger.swarm_lists()[2] == [f"Qm{cheater.peer_id}"] and ledger.org_strikes() == {"acme": 1}
    assert credit.verify() == []


def test_a_ban_a_report_makes_due_commits_with_the_report(ledger, credit, tmp_path, monkeypatch):
    peers = Peers(ledger, tmp_path)
    honest, cheater = peers.join("honest"), peers.join("cheater", org="acme")
    for epoch in range(2):
        original = peers.report("honest", epoch, in_ledger=False)
        reports.record(ledger, credit, original, honest.public_bytes, 8)
        copy = peers.report("cheater", epoch, repeat_of=original, in_ledger=False)
        if epoch == 1:  # the second copy makes a strike and a ban due: its eviction fails
            monkeypatch.setattr(credit_module, "evict_peer", lambda db, peer_id, reason: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                reports.record(ledger, credit, copy, cheater.public_bytes, 8)
            monkeypatch.undo()
            assert ledger.report_ids() == {"honest-0", "cheater-0", "honest-1"}  # the report went with the ban
            assert credit.banned_reason(cheater.peer_id) is None and ledger.swarm_lists()[2] == []
        recorded = reports.record(ledger, credit, copy, cheater.public_bytes, 8)
        assert recorded.fresh and any("repeats the sketch" in p for p in recorded.problems)
    assert credit.banned_reason(cheater.peer_id).startswith("1 strike(s)")
    assert ledger.swarm_lists()[2] == [f"Qm{cheater.peer_id}"] and credit.verify() == []
