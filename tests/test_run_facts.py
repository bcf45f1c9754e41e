"""Peers never move the run's facts: a real coordinator (`serve`, TLS) and hand-built signed requests.

The run's epoch and end come from what a quorum of live peers reported (coordinator/books/run_epoch.py),
an impossible Report epoch is refused and counted as evidence, timestamps must be finite, nonces
survive a restart, the reachability probe dials only the requester, and a copied identity is
refused with one `error:` line while its original is live.
"""

from __future__ import annotations

import random
import shutil
import socket
import sqlite3
import threading
import uuid

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import cli, epochs_reported, events, pin, start_coordinator, start_peer, wait_until, write_run
from coordinator.books.run_epoch import reached
from peer.client import SERVICE
from peer.identity import Identity
from peer.reachability import probe_greeting
from peer.report import sign_report
from peer.runconfig import load_run_config
from peer.signing import sign_request
from peer.transport import Endpoint
from protos import coordinator_pb2 as pb

RUN_ID = "digits-demo"
REPLIES = {"Join": pb.JoinReply, "Report": pb.ReportReply, "Heartbeat": pb.HeartbeatReply,
           "StatusProbe": pb.StatusProbeReply}


# --- the rule itself ---------------------------------------------------------------------------

def test_quorum_rule():
    assert reached([], 1) == 0
    assert reached([("o", 4)], 1) == 5  # a lone peer moves the run
    assert reached([("o", 4), ("o", 9)], 2) == 5  # two voters: both must have got there
    assert reached([("o", 3), ("o", 3), ("o", 3), ("o", 10)], 2) == 4  # 1 liar of 4 moves nothing
    assert reached([("o", 3), ("o", 4), ("o", 4), ("o", 10)], 2) == 5  # a majority reached 4
    assert reached([("a", 5), ("a", 5), ("b", 2)], 1) == 3  # two orgs vote: both must support
    assert reached([("a", 5), ("a", 5), ("b", 5)], 1) == 6


def test_report_epoch_verdicts_on_a_real_ledger(tmp_path):
    """Consecutive epochs past the lagging run are refused but are not evidence; a jump and a
    negative epoch are; a voter that leaves stops holding the run back."""
    from coordinator import tokens
    from coordinator.books.ledger import Ledger
    from coordinator.books.run_epoch import EpochRule

    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "ledger.sqlite", EpochRule(min_peers=2, peer_timeout=60, slack=3))
    ledger.add_org("o")
    sessions = {}
    for peer_id in ("a", "b"):
        token, _ = tokens.issue(ledger, key, "run", "o", 3600, 0)
        claims = tokens.decode(token, key.public_key().public_bytes_raw())
        sessions[peer_id] = ledger.admit(claims, peer_id, bytes(32), f"Qm{peer_id}", "cpu").session

    def record(peer_id, epoch):
        assert not ledger.judge_report_epoch(peer_id, epoch).refused
        ledger.record_report(peer_id, sessions[peer_id], uuid.uuid4().hex, epoch, 10, 1.0, 1.0, {})

    record("a", 0)
    record("b", 0)
    assert ledger.run_epoch() == 1
    for epoch in (1, 2, 3, 4):  # b stalls (alive, not reporting); a trains on
        record("a", epoch)
    assert ledger.run_epoch() == 1
    verdict = ledger.judge_report_epoch("a", 5)
    assert verdict.refused and not verdict.evidence  # the next epoch of an honest peer that ran ahead
    assert ledger.judge_report_epoch("b", 9).evidence  # past anything anyone reported: no honest peer does
    verdict = ledger.judge_report_epoch("b", 5)  # b jumps from 1 to 5: where a's state would take it
    assert verdict.refused and not verdict.evidence
    for epoch in (6, 7, 8, 9, 10):  # from where a's state took it, b counts on: refused for now, one by one
        verdict = ledger.judge_report_epoch("b", epoch)
        assert verdict.refused and not verdict.evidence, epoch
    assert ledger.judge_report_epoch("a", 1_000_000).evidence
    assert ledger.judge_report_epoch("a", -1).evidence
    ledger.leave("b", sessions["b"])
    ledger.heartbeat("a", sessions["a"], 5, 1.0)
    assert ledger.run_epoch() == 6  # a is the only voter left: its report of 5, refused for now, is its claim
    ledger.admit(tokens.decode(tokens.issue(ledger, key, "run", "o", 3600, 0)[0],
                               key.public_key().public_bytes_raw()), "b", bytes(32), "Qmb", "cpu")
    assert ledger.run_epoch() == 6  # never goes back
    ledger.close()


def test_a_live_session_refuses_copies_and_a_gone_one_does_not(tmp_path):
    from coordinator import tokens
    from coordinator.books.ledger import Ledger, LedgerError

    key = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_org("o")
    token, _ = tokens.issue(ledger, key, "run", "o", 3600, 0)
    claims = tokens.decode(token, key.public_key().public_bytes_raw())
    first = ledger.admit(claims, "a", bytes(32), "Qma", "cpu", live_within=60)
    for peer_id, swarm_id, fragment in (("a", "Qmnew", "identity.key"), ("b", "Qma", "swarm_identity.key")):
        with pytest.raises(LedgerError) as raised:
            ledger.admit(claims, peer_id, bytes(32), swarm_id, "cpu", live_within=60)
        assert raised.value.code == "ALREADY_EXISTS" and fragment in str(raised.value)
    ledger.authenticate("a", first.session)  # the original keeps its session
    ledger.leave("a", first.session)
    second = ledger.admit(claims, "a", bytes(32), "Qma", "cpu", live_within=60)  # after a Leave: at once
    assert second.session != first.session
    # a crashed original (no Leave) may come back once silent longer than the timeout
    assert ledger.admit(claims, "a", bytes(32), "Qma", "cpu", live_within=1e-6).session != second.session
    ledger.close()


# --- helpers -----------------------------------------------------------------------------------

class Member:
    """A peer admitted by a hand-built signed Join, whose requests the test writes itself."""

    def __init__(self, channel, token: str, sketch_dims: int):
        self.channel, self.sketch_dims = channel, sketch_dims
        self.identity = Identity(Ed25519PrivateKey.generate())
        self.join_body = pb.JoinRequest(
            token=token, public_key=self.identity.public_bytes, hivemind_peer_id=f"Qm{uuid.uuid4().hex}",
            device="cpu", client_version="0.1.0", swarm_auth_key=b"k" * 32).SerializeToString()
        self.join_metadata = sign_request(self.identity, SERVICE + "Join", self.join_body, "")
        reply = call(channel, "Join", self.join_body, self.join_metadata)
        self.peer_id, self.session = reply.peer_id, reply.session

    def rpc(self, name: str, message):
        body = message.SerializeToString()
        return call(self.channel, name, body, sign_request(self.identity, SERVICE + name, body, RUN_ID))

    def heartbeat(self, epoch: int = 0) -> pb.HeartbeatReply:
        return self.rpc("Heartbeat", pb.HeartbeatRequest(peer_id=self.peer_id, session=self.session, epoch=epoch))

    def report(self, epoch: int) -> pb.ReportReply:
        return self.rpc("Report", self.report_request(epoch))

    def report_request(self, epoch: int) -> pb.ReportRequest:
        """A well-formed, signed report (2 micro-batches of 32 samples; no snapshot exists to audit it)."""
        request = pb.ReportRequest(peer_id=self.peer_id, session=self.session, report_id=uuid.uuid4().hex,
                                   epoch=epoch, samples=64, loss=1.0, compute_seconds=1.0)
        request.parameters.norm = 1.0
        request.parameters.projection.extend(random.gauss(0, 1) for _ in range(self.sketch_dims))
        request.compute_dtype = "fp32"
        for index in range(2):
            request.sketches.add(index=index, samples=32, norm=1.0,
                                 projection=[random.gauss(0, 1) for _ in range(self.sketch_dims)])
        sign_report(request, RUN_ID, self.identity.private_key)
        return request


def call(channel, name: str, body: bytes, metadata):
    rpc = channel.unary_unary(SERVICE + name, request_serializer=None,
                              response_deserializer=REPLIES[name].FromString)
    return rpc(body, timeout=10, metadata=metadata)


def refused(function, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        function(*args)
    return raised.value


def rows(coordinator, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{coordinator.data_dir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(sql, args).fetchall()


def run_epoch(coordinator) -> int:
    return coordinator.status()["epoch"]


@pytest.fixture
def served(procs, tmp_path):
    """A fresh coordinator (so no other test's members vote) and a TLS channel to it."""
    run = write_run(tmp_path / "run.toml", epochs=6)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    channel = Endpoint(coordinator.address, coordinator.fingerprint).open()
    yield coordinator, channel, load_run_config(run).verification.sketch_dims
    channel.close()


# --- the run's epoch ---------------------------------------------------------------------------

def test_a_report_refused_for_now_waits_in_the_outbox_while_heartbeats_go_on(served, tmp_path):
    """A report beyond the run's epoch + slack is "not yet": the peer keeps it, in order, and goes on
    heartbeating (treated as an outage, a peer lost its view of the run, stopped pacing itself and
    raced hundreds of epochs ahead); once the run catches up, it is accepted."""
    from peer.client import Admission, CoordinatorLink
    from peer.outbox import Outbox
    from peer.swarm_access import AccessFiles
    from peer.transport import Endpoint

    coordinator, channel, dims = served
    stalled = Member(channel, coordinator.issue_token("other"), dims)  # a voter of a second org
    stalled.report(0)
    ahead = Member(channel, coordinator.token, dims)
    data_dir = tmp_path / "ahead"
    data_dir.mkdir()
    outbox = Outbox(data_dir)
    ids = []
    for epoch in range(7):  # the run stays at 1 (both orgs must support): 0-4 are accepted, 5 and 6 wait
        request = ahead.report_request(epoch)
        outbox.put(request.report_id, request.SerializeToString())
        ids.append(request.report_id)
    admission = Admission(ahead.identity, ahead.peer_id, ahead.session, RUN_ID, AccessFiles(data_dir), 300.0)
    link = CoordinatorLink(Endpoint(coordinator.address, coordinator.fingerprint), admission, outbox, 0.5).start()
    try:
        wait_until(lambda: [i for i, _ in outbox.pending()] == ids[5:], 30, "epochs 0-4 accepted, 5 and 6 kept")
        seen = link.view.updated
        wait_until(lambda: link.view.updated > seen + 1.0, 30, "heartbeats to go on while reports wait")
        assert link.view.reachable and link.view.epoch == 1 and link.epoch_limit(3) == 4
        assert not rows(coordinator, "SELECT * FROM audits WHERE peer_id=?", (ahead.peer_id,))  # no evidence
        for epoch in range(1, 5):  # the stalled voter catches up: the run reaches 5
            stalled.report(epoch)
        wait_until(lambda: not outbox.pending(), 30, "the kept reports to be accepted")
        assert rows(coordinator, "SELECT epoch FROM reports WHERE peer_id=? ORDER BY epoch",
                    (ahead.peer_id,)) == [(epoch,) for epoch in range(7)]
    finally:
        link.close("test over", flush_timeout=2)
        outbox.close()


def test_a_huge_report_epoch_is_refused_counted_as_evidence_and_moves_nothing(served):
    coordinator, channel, dims = served
    honest, liar = Member(channel, coordinator.token, dims), Member(channel, coordinator.token, dims)
    for member in (honest, liar):
        member.report(0)
    assert run_epoch(coordinator) == 1
    reports_before = rows(coordinator, "SELECT report_id FROM reports ORDER BY report_id")

    error = refused(liar.report, 1_000_000)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and "beyond what the run has reached" in error.details()
    failures = rows(coordinator, "SELECT epoch, verdict, reason FROM audits WHERE peer_id=?", (liar.peer_id,))
    assert [(epoch, verdict) for epoch, verdict, _ in failures] == [(1_000_000, "fail")], failures
    assert rows(coordinator, "SELECT report_id FROM reports ORDER BY report_id") == reports_before
    # a heartbeat claiming the same is clamped: neither moves the run or ends it
    liar.heartbeat(1_000_000)
    reply = honest.heartbeat(1)
    assert reply.epoch == 1 and not reply.run_finished
    status = coordinator.status()
    assert status["epoch"] == 1
    assert rows(coordinator, "SELECT COUNT(*) FROM audits WHERE peer_id=?", (honest.peer_id,)) == [(0,)]
    # the run still ends, when the checked epoch reaches [run] epochs = 6
    for epoch in range(1, 6):
        honest.report(epoch)
        liar.report(epoch)
    reply = honest.heartbeat(6)
    assert reply.epoch == 6 and reply.run_finished and run_epoch(coordinator) == 6


def test_one_liar_among_four_cannot_move_the_epoch_past_the_honest_quorum(served):
    coordinator, channel, dims = served
    honest = [Member(channel, coordinator.token, dims) for _ in range(3)]
    liar = Member(channel, coordinator.token, dims)
    for member in (*honest, liar):
        member.report(0)
    tops = {member.peer_id: 0 for member in honest}
    assert run_epoch(coordinator) == 1

    def send(member, epoch):
        for voter in (*honest, liar):  # every member stays live (a voter) throughout
            voter.heartbeat()
        member.report(epoch)
        if member in honest:
            tops[member.peer_id] = epoch
        majority_of_honest = sorted(tops.values())[-2]  # with the liar, 3 of 4 voters needed: 2 honest
        assert run_epoch(coordinator) == majority_of_honest + 1, (tops, epoch)

    for epoch in (1, 2, 3, 4):  # as far as the slack allows, always ahead of the honest peers
        send(liar, epoch)
    send(honest[0], 1)  # liar + one honest peer: still no majority
    assert honest[1].heartbeat(2).epoch == 1
    send(honest[1], 1)
    send(honest[0], 2)
    send(liar, 5)
    error = refused(liar.report, 10)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert run_epoch(coordinator) == 2
    for member in honest:
        assert rows(coordinator, "SELECT COUNT(*) FROM audits WHERE peer_id=? AND verdict='fail'",
                    (member.peer_id,)) == [(0,)], "an honest member was struck"


# --- signed requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("timestamp", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_timestamps_are_refused(served, timestamp):
    coordinator, channel, dims = served
    member = Member(channel, coordinator.token, dims)
    body = pb.HeartbeatRequest(peer_id=member.peer_id, session=member.session, epoch=0).SerializeToString()
    metadata = sign_request(member.identity, SERVICE + "Heartbeat", body, RUN_ID, now=timestamp)
    error = refused(call, channel, "Heartbeat", body, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "finite" in error.details(), error.details()
    assert member.heartbeat().live_peers == 1


def test_a_join_captured_before_a_restart_is_refused_after_it(procs, tmp_path, served):
    coordinator, channel, dims = served
    victim = Member(channel, coordinator.token, dims)  # its Join bytes and metadata are the capture
    victim.heartbeat()
    coordinator.proc.kill()  # kill -9: the nonces must already be on disk
    port = int(coordinator.address.rsplit(":", 1)[1])
    restarted = start_coordinator(procs, coordinator.data_dir, tmp_path / "run.toml", port=port,
                                  name="coordinator-restarted")
    channel = victim.channel = Endpoint(restarted.address, restarted.fingerprint).open()
    try:
        assert victim.heartbeat().live_peers == 1
        error = refused(call, channel, "Join", victim.join_body, victim.join_metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in error.details(), error.details()
        assert victim.heartbeat().live_peers == 1, "the victim lost its session"
    finally:
        channel.close()


# --- the reachability probe --------------------------------------------------------------------

def listening(host: str) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(8)
    server.setblocking(False)
    return server


def connections_waiting(server: socket.socket) -> int:
    """Connections completed against ``server`` so far (the probe returns only after its handshake)."""
    count = 0
    while True:
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


def test_status_probe_dials_only_the_requester_and_echoes_nothing(served):
    coordinator, channel, dims = served
    member = Member(channel, coordinator.token, dims)

    def probe(host, port, nonce="0123456789abcdef"):
        return member.rpc("StatusProbe", pb.StatusProbeRequest(peer_id=member.peer_id, session=member.session,
                                                               host=host, port=port, nonce=nonce))

    # another host (127.0.0.2, on loopback too): never dialed
    elsewhere = listening("127.0.0.2")
    with elsewhere:
        reply = probe("127.0.0.2", elsewhere.getsockname()[1])
        assert not reply.greeted and not reply.connected and "only dials the address" in reply.detail
        assert connections_waiting(elsewhere) == 0

    # another service on the requester's own address: pass/fail only, none of its bytes come back
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as service:
        service.bind(("127.0.0.1", 0))
        service.listen(1)
        service.settimeout(10)
        def banner():
            connection, _ = service.accept()
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.6 secret-banner\r\n")

        thread = threading.Thread(target=banner)
        thread.start()
        reply = probe("127.0.0.1", service.getsockname()[1])
        thread.join(10)
        assert reply.connected and not reply.greeted
        assert b"SSH" not in reply.SerializeToString() and b"secret" not in reply.SerializeToString()

    # the peer's own listener, greeting with the nonce: pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as own:
        own.bind(("127.0.0.1", 0))
        own.listen(1)
        own.settimeout(10)

        def greet():
            connection, _ = own.accept()
            with connection:
                connection.sendall(probe_greeting("feedface"))

        thread = threading.Thread(target=greet)
        thread.start()
        assert probe("127.0.0.1", own.getsockname()[1], nonce="feedface").greeted
        thread.join(10)


# --- a copied identity -------------------------------------------------------------------------

def join_cli(coordinator, data_dir):
    return cli("peer", "join", coordinator.address, "--token", coordinator.token, *pin(coordinator.address),
               "--data-dir", str(data_dir), "--threads", "1", "--progress", "plain", "--connect-timeout", "20",
               timeout=120)


def assert_refused_cleanly(result, fragment: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_copied_identity_is_refused_while_the_original_lives_and_a_restarted_peer_rejoins(procs, tmp_path):
    # alone, a peer would finish an epoch every few milliseconds: big epochs keep the box quiet and its
    # reports flowing as fast as it makes them (a backlog would let its swarm epoch run ahead of the run's)
    run = write_run(tmp_path / "run.toml", epochs=0, min_peers=1, micro_batch_size=512, target_batch_size=32768)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    original_dir = tmp_path / "original"
    original = start_peer(procs, coordinator.address, coordinator.token, original_dir)
    wait_until(lambda: len(epochs_reported(original_dir)) >= 1, 120, "the original's first epoch")

    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(original_dir / "identity.key", copy_dir / "identity.key")
    assert_refused_cleanly(join_cli(coordinator, copy_dir), "identity.key")
    swarm_copy_dir = tmp_path / "swarm-copy"
    swarm_copy_dir.mkdir()
    shutil.copy(original_dir / "swarm_identity.key", swarm_copy_dir / "swarm_identity.key")
    assert_refused_cleanly(join_cli(coordinator, swarm_copy_dir), "swarm_identity.key")

    # the original keeps its session and trains on (a lone peer moves the checked run epoch)
    done = len(epochs_reported(original_dir))
    wait_until(lambda: len(epochs_reported(original_dir)) >= done + 2, 120, "the original to train on")
    assert original.popen.poll() is None
    peer_id = next(e["peer_id"] for e in events(original_dir) if e["event"] == "joined")
    wait_until(lambda: coordinator.status()["epoch"] >= done + 1, 30, "the run epoch to follow the lone peer")
    assert next(p for p in coordinator.status()["peers"] if p["id"] == peer_id)["alive"]
    assert not any(e["event"] == "left" for e in events(original_dir))

    # a crashed original may come back once it has been silent for peer_timeout
    original.kill()
    wait_until(lambda: not next(p for p in coordinator.status()["peers"] if p["id"] == peer_id)["alive"], 60,
               "the killed peer to time out")
    restarted = start_peer(procs, coordinator.address, coordinator.token, original_dir, name="original-restarted")
    joined = lambda: [e for e in events(original_dir) if e["event"] == "joined"]  # noqa: E731
    wait_until(lambda: len(joined()) >= 2, 120, "the restarted peer to join again")
    assert joined()[-1]["peer_id"] == peer_id
    before = len(epochs_reported(original_dir))
    wait_until(lambda: len(epochs_reported(original_dir)) > before, 120, "the restarted peer to train")
    assert restarted.popen.poll() is None
