"""The peer's side of the coordinator link: join once, then report and heartbeat in the background.

The coordinator may restart at any time. The link keeps trying with backoff, resends every
report not yet acknowledged (from the durable outbox), and never blocks training.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from peer import timeouts
from peer.attestation_reader import ATTESTATIONS_FILE, attach_attestations
from peer.errors import EVICTED_PREFIX, UserError
from peer.outbox import Outbox
from peer.report import attach_proof
from peer.signing import sign_request
from peer.swarm_access import AccessFiles
from peer.transport import Endpoint
from protos import coordinator_pb2 as pb

log = logging.getLogger("potluck.peer")

CALL_TIMEOUT = timeouts.CALL  # seconds; every RPC has a deadline (peer/timeouts.py)
# a report beyond the run's checked epoch + slack (coordinator/books/run_epoch.py) is "not yet", not "never":
# the coordinator answers it UNAVAILABLE, so it stays in the outbox and is sent again later
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
# a report the coordinator cannot accept yet (beyond the run's epoch + slack): kept and sent again, but the
# coordinator answered, so heartbeats go on (treated as unreachable, a peer lost its view of the run,
# stopped pacing itself and raced hundreds of epochs ahead)
NOT_YET = grpc.StatusCode.ABORTED
SERVICE = "/potluck.v1.Coordinator/"


class SignedStub:
    """Calls the coordinator with every request signed by this peer's identity (peer/signing.py).

    The request is serialized once here and the signature covers exactly those bytes.
    """

    def __init__(self, channel: grpc.Channel, identity, run_id: str = ""):
        self.channel, self.identity, self.run_id = channel, identity, run_id

    def call(self, name: str, request, reply_type, timeout: float, wait_for_ready: bool = False):
        method = SERVICE + name
        body = request.SerializeToString()
        rpc = self.channel.unary_unary(method, request_serializer=None, response_deserializer=reply_type.FromString)
        return rpc(body, timeout=timeout, wait_for_ready=wait_for_ready,
                   metadata=sign_request(self.identity, method, body, self.run_id))


def join(endpoint: Endpoint, identity, request: pb.JoinRequest, connect_timeout: float) -> pb.JoinReply:
    """One Join call, waiting up to connect_timeout for the coordinator; errors become UserError."""
    channel = endpoint.open(connect_timeout)
    try:
        return SignedStub(channel, identity).call("Join", request, pb.JoinReply, connect_timeout, wait_for_ready=True)
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            hint = (" (or it serves TLS, the default: join with the --fingerprint it printed instead of --insecure)"
                    if endpoint.insecure else "")
            raise UserError(
                f"cannot reach a coordinator at {endpoint.address} within {connect_timeout:.0f}s; check the address "
                f"and that 'coordinator serve' is running there{hint}"
            ) from None
        raise UserError(f"the coordinator refused to admit this peer: {error.details()}") from None
    finally:
        channel.close()


def fetch_checkpoint(endpoint: Endpoint, identity, run_id: str, peer_id: str, session: str, sha256: str,
                     size: int, timeout: float) -> bytes:
    """The bytes of the checkpoint the Join reply announced, chunk by chunk (each a signed call);
    the caller checks them against its sha256."""
    channel = endpoint.open(CALL_TIMEOUT)
    stub = SignedStub(channel, identity, run_id)
    parts, received = [], 0
    deadline = time.monotonic() + timeout
    try:
        while received < size:
            chunk = stub.call("CheckpointFetch", pb.CheckpointFetchRequest(
                peer_id=peer_id, session=session, sha256=sha256, offset=received), pb.CheckpointChunk,
                max(1.0, min(CALL_TIMEOUT * 6, deadline - time.monotonic())))
            if chunk.offset != received or not chunk.data or received + len(chunk.data) > size:
                raise UserError("the coordinator sent a malformed checkpoint chunk; join again")
            parts.append(chunk.data)
            received += len(chunk.data)
            if time.monotonic() > deadline:
                raise UserError(f"the checkpoint did not arrive within {timeout:.0f}s; join again")
    except grpc.RpcError as error:
        raise UserError(f"could not fetch the run's checkpoint from the coordinator: {error.details()}") from None
    finally:
        channel.close()
    return b"".join(parts)


def status_probe(endpoint: Endpoint, identity, run_id: str, request: pb.StatusProbeRequest,
                 timeout: float) -> pb.StatusProbeReply:
    """Ask the coordinator to dial this peer (reachability self-test); raises grpc.RpcError."""
    channel = endpoint.open(timeout)
    try:
        return SignedStub(channel, identity, run_id).call("StatusProbe", request, pb.StatusProbeReply, timeout)
    finally:
        channel.close()


def leave(endpoint: Endpoint, identity, run_id: str, peer_id: str, session: str, reason: str) -> None:
    """Tell the coordinator this peer will not train after all (best effort)."""
    try:
        channel = endpoint.open(CALL_TIMEOUT)
    except UserError:
        return
    try:
        SignedStub(channel, identity, run_id).call(
            "Leave", pb.LeaveRequest(peer_id=peer_id, session=session, reason=reason[:500]), pb.LeaveReply, CALL_TIMEOUT
        )
    except grpc.RpcError:
        pass
    finally:
        channel.close()


@dataclass
class SwarmView:
    """The latest heartbeat reply, for display; stale values are fine."""

    epoch: int = 0
    live_peers: int = 0
    swarm_samples_per_second: float = 0.0
    run_finished: bool = False
    peers_behind: int = 0
    reachable: bool = True
    updated: float = 0.0
    credit: float = 0.0
    credit_verified: bool = False
    audits_passed: int = 0
    audits_failed: int = 0


@dataclass
class Admission:
    """What this peer holds after Join: who it is, its session, and its swarm access."""

    identity: object
    peer_id: str
    session: str
    run_id: str
    access: AccessFiles
    access_token_ttl: float


class CoordinatorLink:
    """Background thread: flush the outbox, heartbeat every interval, reconnect forever (jittered
    backoff, peer/timeouts.py, so a swarm that lost its coordinator does not retry in lockstep).

    Heartbeats also keep this peer's swarm access current: the access token is renewed at half its
    lifetime and the admitted/evicted lists are refreshed when they change. An eviction (revoked
    token, removed org, ban) is noticed here and ends training.
    """

    def __init__(self, endpoint: Endpoint, admission: Admission, outbox: Outbox, heartbeat_interval: float,
                 sign=None):
        self.admission = admission
        self.peer_id, self.session, self.outbox = admission.peer_id, admission.session, outbox
        self.sign = sign  # sign(request): adds the report signature (peer/report.py)
        self.heartbeat_interval = heartbeat_interval
        self.view = SwarmView()
        self.epoch = 0
        self.samples_per_second = 0.0
        self.evicted: str | None = None
        self._token_renewed = time.monotonic()
        self._channel = endpoint.open()
        self._stub = SignedStub(self._channel, admission.identity, admission.run_id)
        self._next_heartbeat = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-link", daemon=True)

    leaving = threading.Event()  # replaced by the run loop's stop event (peer/loop.py)

    def start(self) -> "CoordinatorLink":
        self._thread.start()
        return self

    def report(self, epoch: int, samples: int, loss: float, compute_seconds: float, metrics: dict[str, float],
               proof=None) -> str:
        """Store a report (with its proof of work and the averagers' new attestation records, signed)
        durably and wake the sender; returns its id."""
        report_id = uuid.uuid4().hex
        request = pb.ReportRequest(
            peer_id=self.peer_id, session=self.session, report_id=report_id, epoch=epoch, samples=samples,
            loss=loss, compute_seconds=compute_seconds, metrics=metrics,
        )
        if proof is not None:
            attach_proof(request, proof)
        read_to = attach_attestations(request, self.outbox.data_dir / ATTESTATIONS_FILE,
                                      self.outbox.cursor(ATTESTATIONS_FILE))
        if self.sign is not None:
            self.sign(request)
        self.outbox.put(report_id, request.SerializeToString(), cursors={ATTESTATIONS_FILE: read_to})
        self._wake.set()
        return report_id

    def view_is_fresh(self) -> bool:
        """Whether the last heartbeat reply is recent enough to act on (a few intervals, one call's deadline)."""
        return bool(self.view.updated) and (
            time.monotonic() - self.view.updated < 3 * self.heartbeat_interval + CALL_TIMEOUT)

    def epoch_limit(self, slack: int) -> int | None:
        """The highest swarm epoch that is plausible, per the coordinator's fresh view (None: no fresh view)."""
        return self.view.epoch + slack if self.view_is_fresh() else None

    def refresh(self) -> None:
        """Heartbeat now rather than at the next interval (a fresh view is wanted)."""
        self._next_heartbeat = 0.0
        self._wake.set()

    def wait_for_peers_to_catch_up(self, timeout: float) -> bool:
        """After this peer's last epoch, wait (bounded) until no live peer is still behind it.

        Leaving at once could cut a partner's final all-reduce short; staying until the others have
        reported the same epoch lets every peer end with the same parameters.
        """
        asked = time.monotonic()
        self._next_heartbeat = 0.0
        self._wake.set()
        deadline = asked + timeout
        while time.monotonic() < deadline:
            if self.view.updated > asked and self.view.peers_behind == 0:
                return True
            if self.view.updated > asked:
                self._next_heartbeat = 0.0
                self._wake.set()
            time.sleep(0.2)
        return False

    def _flush(self) -> bool:
        """Send pending reports in order; False when the coordinator is unreachable."""
        for report_id, payload in self.outbox.pending():
            try:
                self._stub.call("Report", pb.ReportRequest.FromString(payload), pb.ReportReply, CALL_TIMEOUT)
                self.outbox.mark_acked(report_id)
            except grpc.RpcError as error:
                if error.code() == NOT_YET:
                    return True  # reachable; this report and the ones after it wait, in order
                if error.code() in RETRYABLE:
                    return False
                if self._note_eviction(error):
                    return False
                log.warning("coordinator rejected report %s: %s", report_id, error.details())
                self.outbox.mark_acked(report_id, error=f"{error.code().name}: {error.details()}")
        return True

    def _note_eviction(self, error: grpc.RpcError) -> bool:
        if error.code() == grpc.StatusCode.PERMISSION_DENIED and (error.details() or "").startswith(EVICTED_PREFIX):
            self.evicted = error.details()
            return True
        return False

    def _heartbeat(self) -> bool:
        access = self.admission.access
        renew = time.monotonic() - self._token_renewed > self.admission.access_token_ttl / 2
        try:
            reply = self._stub.call(
                "Heartbeat",
                pb.HeartbeatRequest(peer_id=self.peer_id, session=self.session, epoch=self.epoch,
                                    samples_per_second=self.samples_per_second,
                                    access_lists_version=access.version(), renew_access_token=renew),
                pb.HeartbeatReply, CALL_TIMEOUT,
            )
        except grpc.RpcError as error:
            if not self._note_eviction(error) and error.code() not in RETRYABLE:
                log.warning("heartbeat refused: %s", error.details())
            return False
        if reply.access_token:
            access.write_token(reply.access_token)
            self._token_renewed = time.monotonic()
        if reply.HasField("access_lists"):
            lists = reply.access_lists
            access.write_lists(lists.version, list(lists.allow), list(lists.deny))
        self.view = SwarmView(reply.epoch, reply.live_peers, reply.swarm_samples_per_second, reply.run_finished,
                              reply.peers_behind, updated=time.monotonic(), credit=reply.credit,
                              credit_verified=reply.credit_verified, audits_passed=reply.audits_passed,
                              audits_failed=reply.audits_failed)
        return True

    def _run(self) -> None:
        failures = 0  # calls failed in a row: the backoff doubles, jittered (timeouts.RECONNECT_*)
        while not self._stop.is_set() and self.evicted is None:
            ok = self._flush()
            if ok and time.monotonic() >= self._next_heartbeat and not self.leaving.is_set():
                ok = self._heartbeat()
                self._next_heartbeat = time.monotonic() + self.heartbeat_interval
            self.view.reachable = ok
            failures = 0 if ok else failures + 1
            wait = self.heartbeat_interval if ok else timeouts.backoff(
                failures - 1, timeouts.RECONNECT_FIRST, min(timeouts.RECONNECT_MAX, self.heartbeat_interval * 2))
            self._wake.wait(wait)
            self._wake.clear()

    def close(self, reason: str, flush_timeout: float = 5.0) -> None:
        """Flush what is pending (bounded), tell the coordinator we leave, stop the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=CALL_TIMEOUT + 1)
        deadline = time.monotonic() + flush_timeout
        while self.evicted is None and self.outbox.pending() and time.monotonic() < deadline and not self._flush():
            time.sleep(0.3)
        if self.evicted is None:
            try:
                self._stub.call("Leave", pb.LeaveRequest(peer_id=self.peer_id, session=self.session, reason=reason),
                                pb.LeaveReply, 3)
            except grpc.RpcError as error:
                log.warning("could not tell the coordinator we leave: %s", error.details())
        self._channel.close()
