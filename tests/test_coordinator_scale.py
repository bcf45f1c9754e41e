"""Heartbeat and Join cost O(1) in the run's size: the benchmark's own measurement at two sizes.

A ratio, not a timing: the calls alternate between the two ledgers round by round (see
benchmarks/coordinator_scale.py), so a busy machine slows both alike. Before the hot paths were
cached, a Heartbeat at 2,000 peers cost about 10x one at 200.
"""

from __future__ import annotations

import pytest

from benchmarks.coordinator_scale import measure


@pytest.mark.slow
def test_heartbeat_and_join_cost_does_not_grow_with_the_peers(tmp_path):
    figures = measure([200, 2000], calls=120, reports=3, workdir=tmp_path)
    small, large = figures["200"], figures["2000"]
    for kind in ("heartbeat", "join"):
        ratio = large[kind]["median_ms"] / small[kind]["median_ms"]
        assert ratio < 4, (kind, ratio, figures)


def test_heartbeat_replies_agree_with_the_full_views(tmp_path):
    """What a cheap Heartbeat says equals what snapshot and accounts (which read every row) say; the
    lists follow an eviction made through another connection (the auditor's process), by version."""
    import random

    from benchmarks.coordinator_scale import Context, build
    from coordinator.books.credit import FAIL
    from coordinator.books.ledger import Ledger
    from coordinator.service import access_lists
    from protos import coordinator_pb2 as pb

    rng = random.Random(1)
    coordinator = build(tmp_path, 30, 2, rng)
    service, ledger = coordinator.service, coordinator.service.ledger
    (me, session), (gone, gone_session), (struck, _) = coordinator.sessions[:3]
    ledger.leave(gone, gone_session)
    service.credit.record_audit(None, struck, 1, 0, FAIL, 0.9, 1.0, "replay differs")
    for peer_id, peer_session in coordinator.sessions[3:12]:  # some peers further on, one slower
        ledger.heartbeat(peer_id, peer_session, rng.choice([2, 4, 6]), rng.choice([10.0, 25.0]))
    ledger._summary = None  # the figures below are read after every change above

    version = access_lists(ledger).version
    reply = service.Heartbeat(pb.HeartbeatRequest(peer_id=me, session=session, epoch=4, samples_per_second=5.0,
                                                  access_lists_version=version), Context())
    state = ledger.snapshot(service.config.peer_timeout)
    live = [p for p in state["peers"] if p["alive"]]
    account = ledger.accounts()[me]
    assert reply.live_peers == len(live)
    assert reply.swarm_samples_per_second == state["swarm_samples_per_second"]
    assert reply.peers_behind == sum(p["epoch"] < 4 and p["id"] != me for p in live)
    assert reply.epoch == state["epoch"] and not reply.run_finished
    assert reply.samples_recorded == next(p["samples"] for p in state["peers"] if p["id"] == me) == 128
    assert (reply.credit, reply.credit_verified, reply.audits_passed, reply.audits_failed) == \
           (account.credit, account.credit_verified, account.audits_passed, account.audits_failed)
    # no window settled yet: the panel shows the reported samples as pending credit, not "credit 0, verified"
    assert (reply.credit, reply.credit_verified) == (128.0, False)
    assert ledger.accounts(struck)[struck] == ledger.accounts()[struck]
    assert not reply.HasField("access_lists")  # the peer's lists are current

    other = Ledger(ledger.path)  # another process's connection evicts a peer
    other.evict(struck, "banned: test")
    other.close()
    reply = service.Heartbeat(pb.HeartbeatRequest(peer_id=me, session=session, epoch=4,
                                                  access_lists_version=version), Context())
    assert reply.HasField("access_lists") and reply.access_lists.version != version
    assert f"Qm{int(struck[2:], 16):044x}" in reply.access_lists.deny


def test_lists_updated_at_admission_equal_the_lists_read_in_full(tmp_path):
    """A Join's admission updates the cached access lists in place of reading every peer: after a new
    peer, a rejoin under another swarm id, a swarm id two identities share, and a re-admission after an
    eviction, they equal the lists built from the whole table."""
    import random

    from benchmarks.coordinator_scale import build
    from coordinator import tokens

    coordinator = build(tmp_path, 20, 1, random.Random(2))
    service, ledger = coordinator.service, coordinator.service.ledger
    claims = tokens.decode(coordinator.token, service.identity.public_bytes)

    def check():
        assert ledger._lists[0] == ledger.meta("lists_changes"), "the admission did not update the cached lists"
        updated = ledger.swarm_lists()
        ledger._lists = None
        assert updated == ledger.swarm_lists()

    ledger.swarm_lists()
    ledger.admit(claims, "p-new", bytes(32), "Qm-new", "cpu")
    check()
    ledger.admit(claims, "p-new", bytes(32), "Qm-new-2", "cpu")  # a rejoin under another swarm id
    check()
    assert "Qm-new" not in ledger.swarm_lists()[1]
    ledger.admit(claims, "p-twin", bytes(32), "Qm-new-2", "cpu")  # two identities, one swarm id
    ledger.admit(claims, "p-new", bytes(32), "Qm-new-3", "cpu")
    check()
    assert "Qm-new-2" in ledger.swarm_lists()[1]  # the twin still holds it
    other, _ = tokens.issue(ledger, service.identity.private_key, service.config.run_id, "volunteers", 0, 0)
    other_claims = tokens.decode(other, service.identity.public_bytes)
    ledger.admit(other_claims, "p-revoked", bytes(32), "Qm-revoked", "cpu")
    ledger.revoke_token(other_claims.id)
    assert "Qm-revoked" in ledger.swarm_lists()[2]
    ledger.admit(claims, "p-revoked", bytes(32), "Qm-revoked", "cpu")  # back with a valid token
    check()
    assert "Qm-revoked" in ledger.swarm_lists()[1] and "Qm-revoked" not in ledger.swarm_lists()[2]
