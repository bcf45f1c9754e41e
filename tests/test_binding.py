"""Binding the averaged vector to the signed report: replay-level rounds on the real credit tables.

A "round" here is what an all-reduce does to each peer's vector: real micro-batches of the digits task
(peer/work.py), the vector hivemind would average (the mean micro-batch gradient), cut into one
contiguous part per reducer, each part through the run's wire codec, and the attestation records
both sides write (peer.sketch.slice_sketch, as the contract says). Reports are signed and go through
Credit.record_report as the service calls it. The last tests send records through the real peer
outbox, client and a real `coordinator serve` over TLS gRPC.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import DIGITS_RUN, start_coordinator, wait_until, write_run
from coordinator import tokens
from coordinator.books.binding import BINDING, OWN_TOLERANCE, Binding
from coordinator.books.credit import Credit
from coordinator.books.ledger import LEDGER_FILE, Ledger
from examples.digits import TASK
from peer.attestation_reader import ATTESTATIONS_FILE, attach_attestations
from peer.compression import round_trip
from peer.identity import load_or_create_identity
from peer.outbox import Outbox
from peer.report import attach_proof, sign_report
from peer.runconfig import parse_run_config
from peer.sketch import gradient_seed, slice_sketch
from peer.work import EpochProof, do_micro_batch
from protos import coordinator_pb2 as pb

MICRO_BATCHES = 3
VERIFY = "\n[verification]\nwindow_epochs = 4\n"


@dataclass
class Work:
    proof: EpochProof
    samples: int


class World:
    """A ledger, the credit tables with binding checks, and peers that all-reduce their gradients."""

    def __init__(self, tmp_path: Path, compression: str = "none"):
        text = DIGITS_RUN.read_text().replace('compression = "none"', f'compression = "{compression}"')
        self.config = parse_run_config(text + VERIFY)
        self.codec = compression
        self.data_dir = tmp_path / "c"
        self.ledger = Ledger(self.data_dir / LEDGER_FILE)
        self.ledger.bind_run(self.config.run_id, self.config.config_hash)
        self.ledger.add_org("default")
        key = Ed25519PrivateKey.generate()
        token, _ = tokens.issue(self.ledger, key, self.config.run_id, "default", 3600, 0)
        self.claims = tokens.decode(token, key.public_key().public_bytes_raw())
        self.credit = Credit(self.ledger.path, self.config.verification, self.config.run_id)
        self.credit.use_binding(Binding.for_run(self.config, TASK))
        self.model = TASK.build_model(self.config.seed)
        self.sizes = [p.numel() for p in self.model.parameters()]
        self.inputs, self.targets = TASK.train_data()
        self.peers: dict[str, object] = {}
        self.proofs: dict[str, Work] = {}
        self.epoch = 0
        self.rounds = 0

    def join(self, *names: str) -> None:
        for name in names:
            identity = load_or_create_identity(self.data_dir.parent / name)
            self.ledger.admit(self.claims, identity.peer_id, identity.public_bytes, swarm(name), "cpu")
            self.peers[name] = identity

    def work(self, name: str) -> tuple[pb.ReportRequest, torch.Tensor]:
        """One epoch of honest work: the signed-to-be report and the vector hivemind would average."""
        identity = self.peers[name]
        dims, device = self.config.verification.sketch_dims, torch.device("cpu")
        proof = EpochProof.start(self.model, self.config.seed, self.epoch, dims, device)
        total = torch.zeros(sum(self.sizes), dtype=torch.float32)
        for index in range(MICRO_BATCHES):
            done = do_micro_batch(TASK, self.model, self.inputs, self.targets, run_seed=self.config.seed,
                                  epoch=self.epoch, peer_id=identity.peer_id, micro_batch=index,
                                  micro_batch_size=self.config.micro_batch_size, sketch_dims=dims, device=device)
            proof.micro_batches.append(done)
            grad = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
            total += grad * (done.samples / self.config.micro_batch_size)
        request = pb.ReportRequest(peer_id=identity.peer_id, report_id=f"{name}-{self.epoch}", epoch=self.epoch,
                                   samples=sum(m.samples for m in proof.micro_batches), loss=1.0,
                                   compute_seconds=0.01)
        attach_proof(request, proof)
        self.proofs[name] = Work(proof, request.samples)
        return request, total / MICRO_BATCHES

    def record(self, role: str, sender: str, reducer: str, offset: int, part: torch.Tensor, group: str,
               weight: float = 1.0) -> dict:
        dims = self.config.verification.sketch_dims
        sketch = slice_sketch(part, offset, self.sizes, gradient_seed(self.config.seed, self.epoch), dims)
        return {"v": 1, "role": role, "kind": "grad", "group": group, "epoch": self.epoch, "sender": swarm(sender),
                "reducer": swarm(reducer), "length": part.numel(), "sketch": list(sketch.projection),
                "norm_sq": float(part.double().norm() ** 2), "weight": weight,
                "score": 0.0, "clipped": False, "time": time.time()}

    def round(self, sent=None, claimed=None, received=None, weights=None) -> dict[str, list[dict]]:
        """One all-reduce of every peer's epoch vector; returns each peer's records and submits nothing.

        ``sent(name, vector)``: what a peer really puts in (default: its vector); ``claimed(name, vector)``:
        what its "sent" records describe (default: what it sent); ``received(reducer, sender, part)``:
        what a reducer's "received" records describe (default: what arrived); ``weights(name, role)``:
        the weight a sender's records (role "sent") or its reducers' (role "received") give it (default 1)."""
        names = list(self.peers)
        group = f"{self.rounds:04x}" + "ab" * 14
        self.rounds += 1
        cuts = [round(i * sum(self.sizes) / len(names)) for i in range(len(names) + 1)]
        records = {name: [] for name in names}
        for sender in names:
            vector = self.vectors[sender]
            put_in = sent(sender, vector) if sent else vector
            described = claimed(sender, vector) if claimed else put_in
            for j, reducer in enumerate(names):
                low, high = cuts[j], cuts[j + 1]
                part, _ = round_trip(put_in[low:high].clone(), self.codec)
                said, _ = round_trip(described[low:high].clone(), self.codec)
                weight = weights(sender, "sent") if weights else 1.0
                records[sender].append(self.record("sent", sender, reducer, low, said, group, weight))
                seen = received(reducer, sender, part) if received else part
                weight = weights(sender, "received") if weights else 1.0
                records[reducer].append(self.record("received", sender, reducer, low, seen, group, weight))
        return records

    def epoch_of_rounds(self, withhold: tuple[str, ...] = (), **round_args) -> None:
        """Every peer works, the swarm all-reduces, every peer reports with its records (those in
        ``withhold`` with none); next epoch."""
        requests, self.vectors = {}, {}
        for name in self.peers:
            requests[name], self.vectors[name] = self.work(name)
        records = self.round(**round_args)
        for name, request in requests.items():
            for record in records[name] if name not in withhold else []:
                request.attestations.append(to_attestation(record))
            self.submit(name, request)
        self.epoch += 1

    def submit(self, name: str, request: pb.ReportRequest) -> None:
        identity = self.peers[name]
        sign_report(request, self.config.run_id, identity.private_key)
        assert self.credit.signature_ok(request, identity.public_bytes)
        self.credit.record_report(request, identity.public_bytes, self.config.micro_batch_size)

    def rows(self) -> dict:
        names = {identity.peer_id: name for name, identity in self.peers.items()}
        return {names[row["peer"]]: row for row in self.credit.peer_rows()}

    def checks(self, kind: str) -> list[dict]:
        names = {identity.peer_id: name for name, identity in self.peers.items()}
        return [{**row, "subject": names.get(row["subject"], row["subject"]),
                 "counterparty": names.get(row["counterparty"], row["counterparty"])}
                for row in Binding.verdicts(self.credit._read) if row["check_kind"] == kind]

    def binding_failures(self) -> dict[str, int]:
        names = {identity.peer_id: name for name, identity in self.peers.items()}
        counts: dict[str, int] = {}
        for row in self.credit.audit_rows():
            if row["kind"] == "binding":
                assert row["verdict"] == "fail" and row["micro_batch"] == BINDING
                counts[names[row["peer_id"]]] = counts.get(names[row["peer_id"]], 0) + 1
        return counts


def swarm(name: str) -> str:
    return f"Qm{name}Swarm"


def to_attestation(record: dict) -> pb.Attestation:
    from peer.attestation_reader import to_message

    return to_message(json.loads(json.dumps(record)))


@pytest.fixture
def world(tmp_path, request):
    w = World(tmp_path, getattr(request, "param", "none"))
    yield w
    w.credit.close()
    w.ledger.close()


def flip_x10(bad: str):
    """What a poisoner puts in: its vector, sign-flipped and scaled x10."""
    return lambda sender, vector: -10 * vector if sender == bad else vector


# --- honest rounds: never evidence ------------------------------------------------------------
@pytest.mark.parametrize("world", ["none", "fp16", "uint8"], indirect=True)
def test_honest_rounds_produce_no_evidence(world):
    world.join("a", "b", "c", "d")
    for _ in range(3):
        world.epoch_of_rounds()
    own, pairs = world.checks("own_report"), world.checks("pair")
    assert len(own) == 3 * 4 and {row["verdict"] for row in own} == {"pass"}, own
    assert len(pairs) == 3 * 4 * 3 and {row["verdict"] for row in pairs} == {"agree"}
    assert world.binding_failures() == {} and not world.checks("blame") and not world.checks("withheld")
    assert all(row["strikes"] == 0 and not row["banned"] for row in world.rows().values())
    worst = max(row["relative_error"] for row in own)
    print(f"codec {world.codec}: worst honest own-report error {worst:.3g} over {len(own)} checks, "
          f"worst norm ratio {max(row['norm_ratio'] for row in own):.3g}")
    # a margin, not a coin flip (uint8's own error is ~0.3 of the vector on digits' sparse gradients)
    assert worst < world.credit.binding.own_tolerance / (1.8 if world.codec == "uint8" else 3)


# --- (a) the sender against its own report ----------------------------------------------------
def test_sign_flipped_x10_sender_is_caught_by_its_own_report(world):
    world.join("a", "b", "c", "poisoner")
    world.epoch_of_rounds(sent=flip_x10("poisoner"))
    assert world.binding_failures() == {"poisoner": 1}
    failed = [row for row in world.checks("own_report") if row["verdict"] == "fail"]
    assert [row["subject"] for row in failed] == ["poisoner"] and failed[0]["relative_error"] > 5
    world.epoch_of_rounds(sent=flip_x10("poisoner"))  # a second, independent round: a strike
    rows = world.rows()
    assert rows["poisoner"]["banned"] and rows["poisoner"]["strikes"] == 1
    assert rows["poisoner"]["samples_provisional"] == 0 and rows["poisoner"]["windows_forfeited"] >= 1
    assert all(rows[name]["strikes"] == 0 and not rows[name]["banned"] for name in "abc")


def test_a_member_tagging_along_with_weight_0_is_not_bound_to_its_report_unless_it_lied_about_it(world):
    # hivemind tags a peer that starts loading state along with weight 0: it sends whatever its buffer
    # holds (the last average), which no rule gives any influence and no report describes
    world.join("a", "b", "c", "loader")
    stale = flip_x10("loader")
    world.epoch_of_rounds(sent=stale, weights=lambda name, role: 0.0 if name == "loader" else 1.0)
    own = {row["subject"]: row for row in world.checks("own_report")}
    assert own["loader"]["verdict"] == "unchecked" and "weight 0" in own["loader"]["detail"], own["loader"]
    assert {own[name]["verdict"] for name in "abc"} == {"pass"}
    assert world.binding_failures() == {}
    # a poisoner claiming weight 0 in its own records, while its reducers saw it declare 1, is checked
    world.epoch_of_rounds(sent=stale, weights=lambda name, role: 0.0 if name == "loader" and role == "sent" else 1.0)
    assert world.binding_failures() == {"loader": 1}


def test_scaled_up_vector_hidden_from_the_sketch_breaks_the_norm_bound(world):
    # a vector the count sketch cannot see (two coordinates of one bucket with opposite signed
    # contributions) added to the honest one: the sketch matches, the norm bound does not
    world.join("a", "b", "c")
    hidden = torch.zeros(sum(world.sizes))

    def sneak(sender, vector):
        if sender != "c":
            return vector
        dims = world.config.verification.sketch_dims
        seed = gradient_seed(world.config.seed, world.epoch)
        unit = lambda i: slice_sketch(torch.ones(1), i, world.sizes, seed, dims).projection  # noqa: E731
        first = unit(0)
        bucket = next(i for i, x in enumerate(first) if x)
        partner = next(j for j in range(dims, sum(world.sizes), dims) if unit(j)[bucket])
        hidden.zero_()
        hidden[0], hidden[partner] = 100.0, -100.0 * first[bucket] * unit(partner)[bucket]
        return vector + hidden

    world.epoch_of_rounds(sent=sneak)
    failed = [row for row in world.checks("own_report") if row["verdict"] == "fail"]
    assert [row["subject"] for row in failed] == ["c"]
    assert failed[0]["relative_error"] < 1e-3 and failed[0]["norm_ratio"] > 10, failed


# --- (b) senders against reducers ---------------------------------------------------------------
def test_sender_lying_in_its_records_is_blamed_by_three_reducers(world):
    world.join("a", "b", "liar")
    world.epoch_of_rounds(sent=flip_x10("liar"), claimed=lambda sender, vector: vector)
    assert world.binding_failures() == {"liar": 1}
    assert [row["subject"] for row in world.checks("blame")] == ["liar"]
    assert {row["verdict"] for row in world.checks("own_report")} == {"pass"}  # its records match its report
    disputes = {(row["subject"], row["counterparty"]) for row in world.checks("pair") if row["verdict"] == "dispute"}
    assert disputes == {("liar", "a"), ("liar", "b")}
    world.epoch_of_rounds(sent=flip_x10("liar"), claimed=lambda sender, vector: vector)
    rows = world.rows()
    assert rows["liar"]["banned"] and not rows["a"]["banned"] and not rows["b"]["banned"]
    assert rows["a"]["strikes"] == rows["b"]["strikes"] == 0


def test_in_a_two_peer_group_a_dispute_stays_unresolved(world):
    world.join("a", "liar")
    for _ in range(2):
        world.epoch_of_rounds(sent=flip_x10("liar"), claimed=lambda sender, vector: vector)
    disputes = [row for row in world.checks("pair") if row["verdict"] == "dispute"]
    assert len(disputes) == 2 and not world.checks("blame")
    assert world.binding_failures() == {}
    assert not any(row["banned"] or row["strikes"] for row in world.rows().values())


def test_framing_reducer_is_blamed_not_the_senders(world):
    world.join("a", "b", "c", "framer")
    frame = lambda reducer, sender, part: -part if reducer == "framer" and sender != "framer" else part  # noqa: E731
    for _ in range(2):
        world.epoch_of_rounds(received=frame)
    assert sorted({row["subject"] for row in world.checks("blame")}) == ["framer"]
    rows = world.rows()
    assert rows["framer"]["banned"]
    assert all(rows[name]["strikes"] == 0 and not rows[name]["banned"] for name in "abc")
    assert {row["verdict"] for row in world.checks("own_report")} == {"pass"}


def test_a_sender_that_attests_nothing_is_recorded_not_punished(world):
    world.join("a", "b", "quiet")
    for _ in range(4):
        world.epoch_of_rounds(withhold=("quiet",), sent=flip_x10("quiet"))
    withheld = world.checks("withheld")
    # the round of epoch 0 is due by the report of epoch 3 (WITHHELD_AFTER = 3)
    assert [(row["subject"], row["epoch"], row["verdict"]) for row in withheld] == [("quiet", 0, "unresolved")]
    assert world.binding_failures() == {} and not any(row["strikes"] for row in world.rows().values())


def test_parts_lost_in_a_failed_round_are_no_dispute(world):
    # the links of sender "a" to two reducers broke mid-part: they received only the first half
    world.join("a", "b", "c")
    def halves(reducer, sender, part):
        return part[: part.numel() // 2] if sender == "a" and reducer != "a" else part

    world.epoch_of_rounds(received=halves)
    verdicts = {(row["subject"], row["counterparty"]): row["verdict"] for row in world.checks("pair")}
    assert verdicts[("a", "b")] == verdicts[("a", "c")] == "incomplete"
    assert not world.checks("blame") and world.binding_failures() == {}


# --- what a peer may attest ----------------------------------------------------------------------
def test_records_for_others_unknown_ids_and_bad_shapes_are_ignored(world):
    world.join("a", "b")
    requests, world.vectors = {}, {}
    for name in world.peers:
        requests[name], world.vectors[name] = world.work(name)
    mine = next(r for r in world.round()["a"] if r["role"] == "sent" and r["reducer"] == swarm("b"))
    request = requests["a"]
    for record in (dict(mine, sender=swarm("b"), reducer=swarm("a")),   # a "sent" record of another sender
                   dict(mine, role="received"),                          # a "received" record of another reducer
                   dict(mine, reducer="QmNobody"),                       # a counterparty the ledger never admitted
                   dict(mine, sketch=[1.0]),                             # the wrong sketch size
                   dict(mine, epoch=10_000),                             # an epoch the run has not reached
                   dict(mine, length=10**9)):                            # more coordinates than the model has
        request.attestations.append(to_attestation(record))
    world.submit("a", request)
    assert world.credit._read("SELECT COUNT(*) AS n FROM attestations")[0]["n"] == 0
    assert not world.checks("pair") and world.binding_failures() == {}


@pytest.mark.slow
def test_the_ledger_shows_binding_verdicts(world, tmp_path):
    from conftest import cli

    world.join("a", "b", "poisoner")
    world.epoch_of_rounds(sent=flip_x10("poisoner"))
    world.credit.close()
    result = cli("coordinator", "ledger", "--data-dir", str(world.data_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["peer"]: row for row in json.loads(result.stdout)}
    verified = cli("coordinator", "ledger", "verify", "--data-dir", str(world.data_dir))
    assert verified.returncode == 0, verified.stderr  # the records are in the signed, logged report bodies
    assert rows[world.peers["poisoner"].peer_id]["audits_failed"] == 1
    assert rows[world.peers["a"].peer_id]["audits_failed"] == 0
    world.credit = Credit(world.ledger.path, world.config.verification, world.config.run_id)
    kinds = [(row["kind"], row["reason"]) for row in world.credit.audit_rows()]
    assert len(kinds) == 1 and kinds[0][0] == "binding" and "differs from its report" in kinds[0][1]


# --- the peer's reader --------------------------------------------------------------------------
def test_reader_tolerates_a_missing_file_a_torn_line_and_carries_the_rest(tmp_path):
    path = tmp_path / ATTESTATIONS_FILE
    request = pb.ReportRequest()
    assert attach_attestations(request, path, 0) == 0 and not request.attestations
    record = {"v": 1, "role": "sent", "kind": "grad", "group": "ab", "epoch": 3, "sender": "QmA", "reducer": "QmB",
              "length": 5, "sketch": [0.5, -1.0], "norm_sq": 2.0, "weight": 0.0, "score": 0.0, "clipped": False,
              "time": 1.0}
    line = (json.dumps(record) + "\n").encode()
    path.write_bytes(line + b"not json\n" + line + line + line[:20])  # a malformed line, and a torn last one
    first = pb.ReportRequest()
    offset = attach_attestations(first, path, 0, max_records=2)
    assert len(first.attestations) == 2 and offset == 2 * len(line) + len(b"not json\n")
    assert first.attestations[0].sender == "QmA" and list(first.attestations[0].sketch) == [0.5, -1.0]
    second = pb.ReportRequest()
    offset = attach_attestations(second, path, offset)
    assert len(second.attestations) == 1 and offset == 3 * len(line) + len(b"not json\n")  # torn line left
    with open(path, "ab") as file:
        file.write(line[20:])
    third = pb.ReportRequest()
    assert attach_attestations(third, path, offset) == path.stat().st_size and len(third.attestations) == 1
    fourth = pb.ReportRequest()
    assert attach_attestations(fourth, path, path.stat().st_size) == path.stat().st_size
    assert not fourth.attestations
    # a byte budget: records that would push the report past it wait for the next report
    small = pb.ReportRequest()
    assert attach_attestations(small, path, 0, max_bytes=20) == 0 and not small.attestations


def test_outbox_keeps_records_and_read_position_together(tmp_path):
    outbox = Outbox(tmp_path)
    request = pb.ReportRequest(report_id="r1")
    request.attestations.add(role="sent", group="ab", sketch=[1.0, 2.0])
    outbox.put("r1", request.SerializeToString(), cursors={ATTESTATIONS_FILE: 123})
    outbox.close()
    again = Outbox(tmp_path)  # after a crash
    assert again.cursor(ATTESTATIONS_FILE) == 123 and again.cursor("other") == 0
    [(report_id, payload)] = again.pending()
    assert report_id == "r1" and list(pb.ReportRequest.FromString(payload).attestations[0].sketch) == [1.0, 2.0]
    again.close()


# --- through the real client and a real coordinator -----------------------------------------------
def test_records_travel_from_the_peers_file_to_the_coordinators_tables(tmp_path, procs):
    """The real path: attestations.jsonl -> CoordinatorLink.report -> outbox -> signed Report over
    TLS gRPC -> `coordinator serve` -> its ledger tables and a binding verdict."""
    from peer.client import Admission, CoordinatorLink, SignedStub
    from peer.swarm_access import AccessFiles
    from peer.transport import Endpoint

    coordinator = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml"))
    endpoint = Endpoint(coordinator.address, coordinator.fingerprint)
    world = World(tmp_path / "w")
    world.join("a", "b")  # only to compute honest work and records; the coordinator admits its own copies
    admitted = {}
    for name in ("a", "b"):
        identity = load_or_create_identity(tmp_path / "peers" / name)
        channel = endpoint.open()
        join = pb.JoinRequest(token=coordinator.issue_token(f"org-{name}"), public_key=identity.public_bytes,
                              hivemind_peer_id=swarm(name), device="cpu", client_version="test",
                              swarm_auth_key=b"k" * 32)
        reply = SignedStub(channel, identity).call("Join", join, pb.JoinReply, 10)
        channel.close()
        admitted[name] = (identity, reply)
        world.peers[name] = identity
    world.vectors = {}
    for name in ("a", "b"):
        _, world.vectors[name] = world.work(name)
    records = world.round()
    identity, reply = admitted["a"]
    data_dir = tmp_path / "peers" / "a"
    lines = [json.dumps(record) + "\n" for record in records["a"]]
    (data_dir / ATTESTATIONS_FILE).write_text("".join(lines[:-1]) + lines[-1][:30])  # the last one torn
    outbox = Outbox(data_dir)
    admission = Admission(identity, reply.peer_id, reply.session, reply.run_id, AccessFiles(data_dir), 300.0)
    link = CoordinatorLink(endpoint, admission, outbox, 1.0,
                           sign=lambda r: sign_report(r, reply.run_id, identity.private_key)).start()
    ledger = coordinator.data_dir / LEDGER_FILE
    expected = {(r["role"], r["sender"], r["reducer"]) for r in records["a"]}
    try:
        link.report(0, world.proofs["a"].samples, 1.0, 0.01, {}, world.proofs["a"].proof)
        wait_until(lambda: not outbox.pending(), 30, "the report to be acknowledged")
        assert set(stored_records(ledger)) == expected - {(records["a"][-1]["role"], swarm("b"), swarm("a"))}
        with open(data_dir / ATTESTATIONS_FILE, "a") as file:  # the averager finishes its line
            file.write(lines[-1][30:])
        world.epoch = 1
        world.work("a")
        link.report(1, world.proofs["a"].samples, 1.0, 0.01, {}, world.proofs["a"].proof)
        wait_until(lambda: not outbox.pending(), 30, "the second report to be acknowledged")
        assert set(stored_records(ledger)) == expected
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
            verdicts = db.execute("SELECT check_kind, verdict FROM binding_checks").fetchall()
        assert verdicts == [("own_report", "pass")]  # a's "sent" records cover its vector, match its report
    finally:
        link.close("test over", flush_timeout=2)
        outbox.close()
        world.credit.close()
        world.ledger.close()


def stored_records(ledger: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        return db.execute("SELECT role, sender, reducer FROM attestations ORDER BY role DESC, reducer").fetchall()


def test_malformed_records_are_refused_before_anything_is_stored():
    from coordinator.books.binding import malformed

    request = pb.ReportRequest()
    request.attestations.add(role="sent", sketch=[math.inf])
    assert "non-finite" in malformed(request)
    request = pb.ReportRequest()
    request.attestations.add(role="sent", group="x" * 500)
    assert "oversized" in malformed(request)


def test_a_backlog_is_carried_over_reports_under_the_message_limit(tmp_path):
    from peer.transport import MAX_MESSAGE_BYTES

    record = {"role": "received", "kind": "grad", "group": "ab" * 16, "epoch": 1, "sender": "Qm" + "x" * 44,
              "reducer": "Qm" + "y" * 44, "length": 4096, "sketch": [0.123456789] * 64, "norm_sq": 1.0}
    path = tmp_path / ATTESTATIONS_FILE
    path.write_text((json.dumps(record) + "\n") * 3000)
    offset, seen = 0, 0
    while offset < path.stat().st_size:
        request = pb.ReportRequest(report_id="r")
        offset = attach_attestations(request, path, offset)
        assert request.attestations and request.ByteSize() < MAX_MESSAGE_BYTES * 0.8
        seen += len(request.attestations)
    assert seen == 3000


def test_uint8_honest_error_over_many_seeds_stays_under_the_tolerance(world):
    """The own-report error of an honest uint8 sender, over 6 real vectors x 150 sketch seeds."""
    from peer.sketch import count_sketch

    world.join("a", "b")
    errors = []
    for epoch in range(3):
        world.epoch = epoch
        for name in ("a", "b"):
            _, vector = world.work(name)
            cuts = [round(i * vector.numel() / 4) for i in range(5)]
            decoded = torch.cat([round_trip(vector[lo:hi].clone(), "uint8")[0] for lo, hi in zip(cuts, cuts[1:])])
            for seed in range(150):
                exact = torch.tensor(count_sketch([vector], seed, 64).projection)
                wire = torch.tensor(count_sketch([decoded], seed, 64).projection)
                errors.append(float((wire - exact).norm() / exact.norm()))
    errors.sort()
    print(f"uint8 honest own-report error: median {errors[len(errors) // 2]:.3f}, "
          f"99th percentile {errors[int(0.99 * len(errors))]:.3f}, max {errors[-1]:.3f} over {len(errors)}")
    assert errors[-1] < OWN_TOLERANCE["uint8"] / 1.5


def test_what_one_peer_can_store_is_bounded(world):
    from coordinator.books.binding import MAX_GROUPS_PER_EPOCH

    world.join("a", "b")
    requests, world.vectors = {}, {}
    for name in world.peers:
        requests[name], world.vectors[name] = world.work(name)
    mine = next(r for r in world.round()["a"] if r["role"] == "sent" and r["reducer"] == swarm("b"))
    request = requests["a"]
    for group in range(MAX_GROUPS_PER_EPOCH + 3):  # invented rounds under one epoch label
        request.attestations.append(to_attestation(dict(mine, group=f"{group:032x}")))
    world.submit("a", request)
    groups = world.credit._read("SELECT COUNT(DISTINCT group_id) AS n FROM attestations")[0]["n"]
    assert groups == MAX_GROUPS_PER_EPOCH
