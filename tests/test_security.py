"""Attacks on a real coordinator over real TLS gRPC: each is refused with a clear error and changes nothing.

The requests are built by hand here (the attacker does not use potluck's client), signed or not as
the attack needs; the ledger is compared before and after every attack and the server must survive.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli, start_coordinator, wait_until, write_run
from peer.client import SERVICE
from peer.identity import Identity, peer_id_of
from peer.signing import sign_request
from peer.transport import Endpoint
from protos import coordinator_pb2 as pb

RPCS = {"Join": pb.JoinReply, "Report": pb.ReportReply, "Heartbeat": pb.HeartbeatReply, "Leave": pb.LeaveReply}


@pytest.fixture(scope="module")
def channel(coordinator):
    channel = Endpoint(coordinator.address, coordinator.fingerprint).open()
    yield channel
    channel.close()


def ledger_fingerprint(coordinator) -> str:
    """A digest of every row of the ledger file (read-only, straight from sqlite)."""
    with sqlite3.connect(f"file:{coordinator.data_dir / 'ledger.sqlite'}?mode=ro", uri=True) as db:
        return hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()


def call(channel, name: str, body: bytes, metadata=None, timeout: float = 10.0):
    rpc = channel.unary_unary(SERVICE + name, request_serializer=None, response_deserializer=RPCS[name].FromString)
    return rpc(body, timeout=timeout, metadata=metadata)


def signed(identity: Identity, name: str, body: bytes, run_id: str = "digits-demo", now: float | None = None):
    return sign_request(identity, SERVICE + name, body, run_id, now=now)


def join_request(identity: Identity, token: str) -> bytes:
    # a swarm id of its own: two live sessions may not share one (a copied swarm_identity.key)
    return pb.JoinRequest(token=token, public_key=identity.public_bytes,
                          hivemind_peer_id=f"QmAttacker-{peer_id_of(identity.public_bytes)}",
                          device="cpu", client_version="0.1.0", swarm_auth_key=b"k" * 32).SerializeToString()


def refused(channel, name, body, metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, name, body, metadata)
    return raised.value


@pytest.fixture(scope="module")
def member(coordinator, channel):
    """A legitimately admitted peer (its own single-use token), whose calls attackers try to forge."""
    identity = Identity(Ed25519PrivateKey.generate())
    token = coordinator.issue_token("members")
    body = join_request(identity, token)
    reply = call(channel, "Join", body, signed(identity, "Join", body, run_id=""))
    return identity, reply


def heartbeat_body(reply) -> bytes:
    return pb.HeartbeatRequest(peer_id=reply.peer_id, session=reply.session, epoch=1).SerializeToString()


def test_member_heartbeat_works(channel, member):
    identity, reply = member
    body = heartbeat_body(reply)
    assert call(channel, "Heartbeat", body, signed(identity, "Heartbeat", body)).live_peers >= 0


@pytest.mark.parametrize("make_token, code, fragment", [
    (lambda c: "plk1.e30.AAAA", "UNAUTHENTICATED", "unknown join token"),
    (lambda c: "garbage", "UNAUTHENTICATED", "unknown join token"),
    (lambda c: expired_token(c), "UNAUTHENTICATED", "expired"),
    (lambda c: forged_token(c), "UNAUTHENTICATED", "bad signature"),
    (lambda c: revoked_token(c), "PERMISSION_DENIED", "revoked"),
], ids=["unknown", "garbage", "expired", "forged", "revoked"])
def test_bad_token_join_changes_nothing(coordinator, channel, make_token, code, fragment):
    token = make_token(coordinator)
    before = ledger_fingerprint(coordinator)
    identity = Identity(Ed25519PrivateKey.generate())
    body = join_request(identity, token)
    error = refused(channel, "Join", body, signed(identity, "Join", body, run_id=""))
    assert error.code().name == code and fragment in error.details(), error.details()
    assert ledger_fingerprint(coordinator) == before
    assert coordinator.proc.popen.poll() is None


def expired_token(coordinator) -> str:
    token = coordinator.issue_token("expiring", "--expires", "1s")
    issued = time.time()
    wait_until(lambda: time.time() > issued + 1.5, 5, "the 1-second token to expire")
    return token


def forged_token(coordinator) -> str:
    from coordinator import tokens

    real = tokens.decode(coordinator.token, bytes.fromhex(json.loads(
        (coordinator.data_dir / "coordinator.json").read_text())["public_key"]))
    return tokens.encode(real, Ed25519PrivateKey.generate())


def revoked_token(coordinator) -> str:
    token = coordinator.issue_token("revoked-org")
    listed = json.loads(cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir),
                            "--format", "json").stdout)
    token_id = [t["id"] for t in listed if t["org"] == "revoked-org"][-1]
    assert cli("coordinator", "token", "revoke", token_id, "--data-dir", str(coordinator.data_dir)).returncode == 0
    return token


def test_token_reused_by_second_identity(coordinator, channel):
    token = coordinator.issue_token("single")
    first = Identity(Ed25519PrivateKey.generate())
    body = join_request(first, token)
    call(channel, "Join", body, signed(first, "Join", body, run_id=""))
    before = ledger_fingerprint(coordinator)
    second = Identity(Ed25519PrivateKey.generate())
    body = join_request(second, token)
    error = refused(channel, "Join", body, signed(second, "Join", body, run_id=""))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "already used" in error.details()
    assert ledger_fingerprint(coordinator) == before


def test_join_must_be_signed_by_the_key_it_registers(coordinator, channel):
    victim, thief = Identity(Ed25519PrivateKey.generate()), Identity(Ed25519PrivateKey.generate())
    body = join_request(victim, coordinator.token)
    before = ledger_fingerprint(coordinator)
    error = refused(channel, "Join", body, signed(thief, "Join", body, run_id=""))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "not signed by the key" in error.details()
    assert ledger_fingerprint(coordinator) == before


@pytest.mark.parametrize("attack", ["other-key", "replay", "tampered-body", "wrong-run", "stale", "unsigned"])
def test_forged_or_replayed_requests_are_refused(coordinator, channel, member, attack):
    identity, reply = member
    body = heartbeat_body(reply)
    metadata = signed(identity, "Heartbeat", body)
    if attack == "other-key":
        metadata = signed(Identity(Ed25519PrivateKey.generate()), "Heartbeat", body)
    elif attack == "replay":
        call(channel, "Heartbeat", body, metadata)  # the genuine request, once
    elif attack == "tampered-body":
        body = pb.HeartbeatRequest(peer_id=reply.peer_id, session=reply.session, epoch=999).SerializeToString()
    elif attack == "wrong-run":
        metadata = signed(identity, "Heartbeat", body, run_id="another-run")
    elif attack == "stale":
        metadata = signed(identity, "Heartbeat", body, now=time.time() - 600)
    else:
        metadata = None
    before = ledger_fingerprint(coordinator)
    error = refused(channel, "Heartbeat", body, metadata)
    expected = {"wrong-run": "FAILED_PRECONDITION"}.get(attack, "UNAUTHENTICATED")
    assert error.code().name == expected, error.details()
    hint = {"other-key": "not signed by the key", "replay": "replayed", "tampered-body": "bad request signature",
            "wrong-run": "another-run", "stale": "clock", "unsigned": "unsigned"}[attack]
    assert hint in error.details(), error.details()
    assert ledger_fingerprint(coordinator) == before


def test_malformed_and_oversized_messages(coordinator, channel, member):
    identity, _ = member
    before = ledger_fingerprint(coordinator)
    garbage = b"\xff\xff\xff\xff"
    error = refused(channel, "Report", garbage, signed(identity, "Report", garbage))
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED), error.details()
    huge = pb.ReportRequest(peer_id="p", report_id="x" * (2 << 20)).SerializeToString()
    error = refused(channel, "Report", huge, signed(identity, "Report", huge))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ledger_fingerprint(coordinator) == before
    assert coordinator.proc.popen.poll() is None


def test_wrong_fingerprint_and_plaintext_are_refused_by_the_peer(coordinator, tmp_path):
    base = ["peer", "join", coordinator.address, "--token", coordinator.token, "--data-dir", str(tmp_path / "p"),
            "--connect-timeout", "5", "--progress", "plain"]
    wrong = cli(*base, "--fingerprint", "ab" * 32)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "refusing to connect" in wrong.stderr and coordinator.fingerprint in wrong.stderr, wrong.stderr
    plaintext = cli(*base, "--insecure")
    assert plaintext.returncode != 0 and "Traceback" not in plaintext.stderr
    assert "cannot reach" in plaintext.stderr and "TLS" in plaintext.stderr, plaintext.stderr
    assert coordinator.status()["peers"] == [] or all(p["device"] != "cpu-x" for p in coordinator.status()["peers"])


def test_tls_client_against_plaintext_server(procs, tmp_path):
    plain = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml"), insecure=True)
    result = cli("peer", "join", plain.address, "--token", plain.token, "--fingerprint", "ab" * 32,
                 "--data-dir", str(tmp_path / "p"), "--connect-timeout", "5")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not speak TLS" in result.stderr and "--insecure" in result.stderr, result.stderr


# --- fuzzing: random bytes and random field values at every RPC ----------------------------------

FIELDS = st.fixed_dictionaries({
    "token": st.text(max_size=80), "peer_id": st.text(max_size=40), "session": st.text(max_size=40),
    "report_id": st.text(max_size=80), "epoch": st.integers(-2**63, 2**63 - 1),
    "samples": st.integers(-2**63, 2**63 - 1), "loss": st.floats(allow_nan=True, allow_infinity=True),
    "device": st.text(max_size=80), "blob": st.binary(max_size=64),
})


def random_message(name: str, f: dict, member_reply) -> bytes:
    peer_id = member_reply.peer_id if f["peer_id"].startswith("m") else f["peer_id"]
    if name == "Join":
        message = pb.JoinRequest(token=f["token"], public_key=f["blob"], hivemind_peer_id=f["device"],
                                 device=f["device"], swarm_auth_key=f["blob"])
    elif name == "Report":
        message = pb.ReportRequest(peer_id=peer_id, session=f["session"], report_id=f["report_id"], epoch=f["epoch"],
                                   samples=f["samples"], loss=f["loss"], compute_seconds=f["loss"])
    elif name == "Heartbeat":
        message = pb.HeartbeatRequest(peer_id=peer_id, session=f["session"], epoch=f["epoch"],
                                      samples_per_second=f["loss"], access_lists_version=f["token"])
    else:
        message = pb.LeaveRequest(peer_id=peer_id, session=f["session"], reason=f["token"])
    return message.SerializeToString()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(name=st.sampled_from(sorted(RPCS)), raw=st.one_of(st.binary(max_size=256), st.none()), fields=FIELDS,
       sign=st.sampled_from(["member", "stranger", "none"]))
def test_fuzz_every_rpc_never_crashes_or_changes_the_ledger(coordinator, channel, member, name, raw, fields, sign):
    identity, reply = member
    body = raw if raw is not None else random_message(name, fields, reply)
    signer = {"member": identity, "stranger": Identity(Ed25519PrivateKey.generate()), "none": None}[sign]
    metadata = signed(signer, name, body, run_id="" if name == "Join" else "digits-demo") if signer else None
    before = ledger_fingerprint(coordinator) if name != "Heartbeat" else None
    try:
        call(channel, name, body, metadata)
    except grpc.RpcError as error:
        assert error.code() != grpc.StatusCode.UNKNOWN, f"an unhandled exception in {name}: {error.details()}"
    if before is not None:
        assert ledger_fingerprint(coordinator) == before, f"a random {name} changed the ledger"
    assert coordinator.proc.popen.poll() is None
    assert peer_id_of(identity.public_bytes) == reply.peer_id


def test_operator_certificate_is_served_and_pinned(procs, tmp_path):
    """--cert/--key: the coordinator serves the operator's certificate, and peers pin its fingerprint."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ops.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("ops.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "ops.crt", tmp_path / "ops.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    expected = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    run = write_run(tmp_path / "run.toml", name="potluck_no_such_task")
    c = start_coordinator(procs, tmp_path / "c", run, extra=("--cert", str(cert_path), "--key", str(key_path)))
    assert c.fingerprint == expected
    assert not (tmp_path / "c" / "tls.crt").exists(), "a self-signed certificate was made although one was given"
    # the join goes through TLS and a signed Join: the refusal comes from the task check, after admission
    result = cli("peer", "join", c.address, "--token", c.token, "--fingerprint", expected,
                 "--data-dir", str(tmp_path / "p"), "--connect-timeout", "10")
    assert result.returncode != 0 and "not installed" in result.stderr, result.stderr


def test_serve_refuses_half_a_certificate(tmp_path):
    result = cli("coordinator", "serve", "--run", str(write_run(tmp_path / "run.toml")), "--data-dir",
                 str(tmp_path / "c"), "--port", "0", "--cert", str(tmp_path / "missing.crt"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--cert and --key go together" in result.stderr, result.stderr
