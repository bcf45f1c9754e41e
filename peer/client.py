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

from peer.errors import UserError
from peer.outbox import Outbox
from peer.report import attach_proof
from protos import coordinator_pb2 as pb
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("potluck.peer")

CALL_TIMEOUT = 5.0  # seconds; every RPC has a deadline
MAX_MESSAGE_BYTES = 1 << 20
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )


def join(address: str, request: pb.JoinRequest, connect_timeout: float) -> pb.JoinReply:
    """One Join call, waiting up to connect_timeout for the coordinator; errors become UserError."""
    channel = _channel(address)
    try:
        return pb_grpc.CoordinatorStub(channel).Join(request, timeout=connect_timeout, wait_for_ready=True)
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise UserError(
                f"cannot reach a coordinator at {address} within {connect_timeout:.0f}s; check the address "
                f"and that 'coordinator serve' is running there"
            ) from None
        raise UserError(f"the coordinator refused to admit this peer: {error.details()}") from None
    finally:
        channel.close()


def leave(address: str, peer_id: str, session: str, reason: str) -> None:
    """Tell the coordinator this peer will not train after all (best effort)."""
    channel = _channel(address)
    try:
        pb_grpc.CoordinatorStub(channel).Leave(
            pb.LeaveRequest(peer_id=peer_id, session=session, reason=reason[:500]), timeout=CALL_TIMEOUT
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


class CoordinatorLink:
    """Background thread: flush the outbox, heartbeat every interval, reconnect forever."""

    def __init__(self, address: str, peer_id: str, session: str, outbox: Outbox, heartbeat_interval: float,
                 sign=None):
        self.peer_id, self.session, self.outbox = peer_id, session, outbox
        self.sign = sign  # sign(request): adds the report signature (peer/report.py)
        self.heartbeat_interval = heartbeat_interval
        self.view = SwarmView()
        self.epoch = 0
        self.samples_per_second = 0.0
        self._channel = _channel(address)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._next_heartbeat = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-link", daemon=True)

    def start(self) -> "CoordinatorLink":
        self._thread.start()
        return self

    def report(self, epoch: int, samples: int, loss: float, compute_seconds: float, metrics: dict[str, float],
               proof=None) -> str:
        """Store a report (with its proof of work, signed) durably and wake the sender; returns its id."""
        report_id = uuid.uuid4().hex
        request = pb.ReportRequest(
            peer_id=self.peer_id, session=self.session, report_id=report_id, epoch=epoch, samples=samples,
            loss=loss, compute_seconds=compute_seconds, metrics=metrics,
        )
        if proof is not None:
            attach_proof(request, proof)
        if self.sign is not None:
            self.sign(request)
        self.outbox.put(report_id, request.SerializeToString())
        self._wake.set()
        return report_id

    def epoch_limit(self, slack: int) -> int | None:
        """The highest swarm epoch that is plausible, per the coordinator's fresh view (None: no fresh view)."""
        fresh = self.view.updated and time.monotonic() - self.view.updated < 3 * self.heartbeat_interval + CALL_TIMEOUT
        return self.view.epoch + slack if fresh else None

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
                self._stub.Report(pb.ReportRequest.FromString(payload), timeout=CALL_TIMEOUT)
                self.outbox.mark_acked(report_id)
            except grpc.RpcError as error:
                if error.code() in RETRYABLE:
                    return False
                log.warning("coordinator rejected report %s: %s", report_id, error.details())
                self.outbox.mark_acked(report_id, error=f"{error.code().name}: {error.details()}")
        return True

    def _heartbeat(self) -> bool:
        try:
            reply = self._stub.Heartbeat(
                pb.HeartbeatRequest(peer_id=self.peer_id, session=self.session, epoch=self.epoch,
                                    samples_per_second=self.samples_per_second),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE:
                log.warning("heartbeat refused: %s", error.details())
            return False
        self.view = SwarmView(reply.epoch, reply.live_peers, reply.swarm_samples_per_second, reply.run_finished,
                              reply.peers_behind, updated=time.monotonic())
        return True

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            ok = self._flush()
            if ok and time.monotonic() >= self._next_heartbeat:
                ok = self._heartbeat()
                self._next_heartbeat = time.monotonic() + self.heartbeat_interval
            self.view.reachable = ok
            backoff = 0.5 if ok else min(backoff * 2, 5.0)
            self._wake.wait(self.heartbeat_interval if ok else backoff)
            self._wake.clear()

    def close(self, reason: str, flush_timeout: float = 5.0) -> None:
        """Flush what is pending (bounded), tell the coordinator we leave, stop the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=CALL_TIMEOUT + 1)
        deadline = time.monotonic() + flush_timeout
        while self.outbox.pending() and time.monotonic() < deadline and not self._flush():
            time.sleep(0.3)
        try:
            self._stub.Leave(pb.LeaveRequest(peer_id=self.peer_id, session=self.session, reason=reason), timeout=3)
        except grpc.RpcError as error:
            log.warning("could not tell the coordinator we leave: %s", error.details())
        self._channel.close()
