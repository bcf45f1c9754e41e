"""Admission rules without a server: signed tokens, the ledger's checks, request signatures, swarm access."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import tokens
from coordinator.auth import CLOCK_WINDOW
from coordinator.books.ledger import Ledger, LedgerError
from coordinator.books.nonces import NonceStore
from peer.errors import EVICTED_PREFIX
from peer.identity import Identity
from peer.signing import SignatureError, sign_request, verify_request
from peer.swarm_access import access_token_valid, issue_access_token

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key().public_bytes_raw()


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_org("lab")
    yield ledger
    ledger.close()


def claims_for(ledger, org="lab", ttl=3600.0, max_peers=1):
    token, _ = tokens.issue(ledger, KEY, "run", org, ttl, max_peers)
    return tokens.decode(token, PUBLIC)


def admit(ledger, claims, peer_id):
    return ledger.admit(claims, peer_id, bytes(32), f"Qm{peer_id}", "cpu")


# --- token format --------------------------------------------------------------------------------

def test_token_round_trip_carries_its_claims(ledger):
    token, claims = tokens.issue(ledger, KEY, "run", "lab", 7 * 86400, 3)
    decoded = tokens.decode(token, PUBLIC)
    assert decoded == claims and decoded.org == "lab" and decoded.max_peers == 3 and decoded.run_id == "run"
    assert abs(decoded.expires - (time.time() + 7 * 86400)) < 60


@pytest.mark.parametrize("mangle, fragment", [
    (lambda t: tokens.encode(tokens.decode(t, PUBLIC), Ed25519PrivateKey.generate()), "bad signature"),
    (lambda t: t.replace(t.split(".")[1], t.split(".")[1][:-2] + "AA"), "bad signature"),
    (lambda t: t[:-3], "bad signature"),
    (lambda t: "plk_deadbeef_secret", "not a potluck token"),
    (lambda t: "", "not a potluck token"),
    (lambda t: "plk1." + "A" * 5000 + ".x", "not a potluck token"),
], ids=["forged-by-other-key", "tampered-payload", "truncated", "old-format", "empty", "oversized"])
def test_bad_tokens_are_refused(ledger, mangle, fragment):
    token, _ = tokens.issue(ledger, KEY, "run", "lab", 3600, 1)
    with pytest.raises(tokens.TokenError, match=fragment):
        tokens.decode(mangle(token), PUBLIC)


def test_expired_token_is_refused(ledger):
    token, claims = tokens.issue(ledger, KEY, "run", "lab", 60, 1)
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.decode(token, PUBLIC, now=claims.expires + 1)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                           ("2w", 1209600), ("never", 0)])
def test_parse_duration(text, seconds):
    assert tokens.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "0d", "-1d", "7 days", "1y"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration"):
        tokens.parse_duration(text)


# --- the ledger's admission checks ---------------------------------------------------------------

def test_single_use_token_binds_the_first_identity(ledger):
    claims = claims_for(ledger, max_peers=1)
    admit(ledger, claims, "p-1")
    admit(ledger, claims, "p-1")  # the same identity may come back
    with pytest.raises(LedgerError, match="already used") as raised:
        admit(ledger, claims, "p-2")
    assert raised.value.code == "PERMISSION_DENIED"
    assert [p["id"] for p in ledger.snapshot(60)["peers"]] == ["p-1"]


def test_revoking_a_token_evicts_its_peers_and_refuses_it(ledger):
    claims = claims_for(ledger, max_peers=0)
    first, other = admit(ledger, claims, "p-1"), admit(ledger, claims_for(ledger), "p-other")
    assert ledger.revoke_token(claims.id) == 1
    with pytest.raises(LedgerError) as raised:
        ledger.heartbeat("p-1", first.session, 1, 1.0)
    assert raised.value.code == "PERMISSION_DENIED" and str(raised.value).startswith(EVICTED_PREFIX)
    ledger.heartbeat("p-other", other.session, 1, 1.0)  # other tokens are untouched
    with pytest.raises(LedgerError, match="revoked"):
        admit(ledger, claims, "p-3")
    version, allow, deny = ledger.swarm_lists()
    assert "Qmp-1" in deny and "Qmp-1" not in allow and "Qmp-other" in allow


def test_removing_an_org_evicts_it_and_keeps_history(ledger):
    ledger.add_org("gone")
    admission = admit(ledger, claims_for(ledger, org="gone"), "p-g")
    ledger.record_report("p-g", admission.session, "r1", 0, 100, 1.0, 1.0, {})
    spare = claims_for(ledger, org="gone")
    assert ledger.remove_org("gone") == 1
    with pytest.raises(LedgerError, match="evicted"):
        ledger.heartbeat("p-g", admission.session, 1, 1.0)
    with pytest.raises(LedgerError, match="revoked"):
        admit(ledger, spare, "p-h")
    with pytest.raises(Exception, match="unknown org"):
        tokens.issue(ledger, KEY, "run", "gone", 3600, 1)
    assert ledger.snapshot(60)["samples"] == 100, "credit history must survive the org's removal"


def test_org_quota_limits_active_peers(ledger):
    ledger.add_org("small", max_peers=1)
    admit(ledger, claims_for(ledger, org="small"), "p-1")
    with pytest.raises(LedgerError, match="quota") as raised:
        admit(ledger, claims_for(ledger, org="small"), "p-2")
    assert raised.value.code == "RESOURCE_EXHAUSTED"


def test_banned_identity_cannot_rejoin(ledger):
    admit(ledger, claims_for(ledger), "p-1")
    assert ledger.evict("p-1", "banned: failed audits")
    with pytest.raises(LedgerError, match="banned"):
        admit(ledger, claims_for(ledger), "p-1")


def test_swarm_lists_version_changes_with_membership(ledger):
    before = ledger.swarm_lists()[0]
    admit(ledger, claims_for(ledger), "p-1")
    assert ledger.swarm_lists()[0] != before


# --- request signatures --------------------------------------------------------------------------

IDENTITY = Identity(Ed25519PrivateKey.generate())
METHOD = "/potluck.v1.Coordinator/Heartbeat"


def headers(body: bytes, **overrides) -> dict:
    metadata = dict(sign_request(IDENTITY, METHOD, body, "run"))
    return metadata | overrides


def test_signature_verifies_and_names_its_key():
    key, timestamp, nonce, run_id = verify_request(headers(b"body"), METHOD, b"body")
    assert key == IDENTITY.public_bytes and run_id == "run" and abs(timestamp - time.time()) < 5


@pytest.mark.parametrize("case", ["tampered-body", "other-method", "other-run", "missing", "garbage"])
def test_signature_refuses(case):
    metadata, method, body = headers(b"body"), METHOD, b"body"
    if case == "tampered-body":
        body = b"bodY"
    elif case == "other-method":
        method = "/potluck.v1.Coordinator/Leave"
    elif case == "other-run":
        metadata["x-potluck-run"] = "another"
    elif case == "missing":
        del metadata["x-potluck-signature"]
    else:
        metadata["x-potluck-signature"] = "zz"
    with pytest.raises(SignatureError):
        verify_request(metadata, method, body)


def test_nonce_store_catches_replays_across_a_reopen_and_prunes_old_ones(tmp_path):
    store = NonceStore(tmp_path / "nonces.sqlite", window=CLOCK_WINDOW)
    key, other = bytes(32), bytes([1]) * 32
    assert store.add(key, "a", 1000.0) and store.add(key, "b", 1000.0) and store.add(other, "a", 1000.0)
    assert not store.add(key, "a", 1001.0)
    store.close()
    reopened = NonceStore(tmp_path / "nonces.sqlite", window=CLOCK_WINDOW)  # as after a coordinator restart
    assert not reopened.add(key, "a", 1002.0) and not reopened.add(key, "b", 1002.0)
    # long after the window, old entries go (their requests fail the clock check anyway)
    assert reopened.add(key, "c", 1000.0 + 3 * CLOCK_WINDOW)
    assert reopened.add(key, "a", 1000.0 + 3 * CLOCK_WINDOW + 1)


# --- swarm access tokens -------------------------------------------------------------------------

def test_access_token_checks_signature_and_expiry():
    token = issue_access_token(KEY, "QmPeer", b"rsa-key", ttl=60)
    assert access_token_valid(token, PUBLIC)
    assert not access_token_valid(token, PUBLIC, now=time.time() + 61)
    forged = issue_access_token(Ed25519PrivateKey.generate(), "QmPeer", b"rsa-key", ttl=60)
    assert not access_token_valid(forged, PUBLIC)
    token.username = "QmSomeoneElse"
    assert not access_token_valid(token, PUBLIC)
