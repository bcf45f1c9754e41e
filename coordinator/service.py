"""The gRPC service peers talk to: Join, Report, Heartbeat, Leave.

Every handler validates its input, turns ledger refusals into gRPC status codes with a message a
volunteer can act on, and never lets a bad request take the server down.
"""

from __future__ import annotations

import logging
import math

import grpc

from coordinator.credit import Credit
from coordinator.ledger import Ledger, LedgerError
from peer.identity import peer_id_of
from peer.runconfig import RunConfig
from protos import coordinator_pb2 as pb
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("potluck.coordinator")

MAX_METRICS = 32


def _abort(context: grpc.ServicerContext, error: LedgerError):
    context.abort(getattr(grpc.StatusCode, error.code), str(error))


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, ledger: Ledger, config: RunConfig, initial_peers: list[str], credit: Credit | None = None):
        self.ledger = ledger
        self.config = config
        self.initial_peers = initial_peers
        self.credit = credit or Credit(ledger.path, config.verification, config.run_id)

    def _refuse_banned(self, peer_id: str, context) -> None:
        reason = self.credit.banned_reason(peer_id)
        if reason is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this peer was banned from the run: {reason}")

    def _run_finished(self, epoch: int) -> bool:
        return self.config.epochs > 0 and epoch >= self.config.epochs

    def Join(self, request: pb.JoinRequest, context):
        if len(request.public_key) != 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "public_key must be a 32-byte Ed25519 key")
        if not request.hivemind_peer_id or len(request.hivemind_peer_id) > 128 or len(request.device) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hivemind_peer_id (1-128 chars) and device (<=64) required")
        peer_id = peer_id_of(request.public_key)
        self._refuse_banned(peer_id, context)
        try:
            admission = self.ledger.admit(
                request.token, peer_id, request.public_key, request.hivemind_peer_id, request.device
            )
        except LedgerError as error:
            log.info("refused join of %s: %s", peer_id, error)
            _abort(context, error)
        log.info("admitted peer %s (org %s, %s)", peer_id, admission.org, request.device)
        return pb.JoinReply(
            peer_id=peer_id,
            session=admission.session,
            org=admission.org,
            run_id=self.config.run_id,
            run_config_toml=self.config.text,
            run_config_hash=self.config.config_hash,
            initial_peers=self.initial_peers,
            epoch=self.ledger.snapshot(self.config.peer_timeout)["epoch"],
        )

    def Report(self, request: pb.ReportRequest, context):
        bad = (
            request.epoch < 0
            or request.samples < 0
            or not math.isfinite(request.loss)
            or not math.isfinite(request.compute_seconds)
            or not 0 < len(request.report_id) <= 64
            or len(request.metrics) > MAX_METRICS
            or not all(math.isfinite(v) and len(k) <= 64 for k, v in request.metrics.items())
        )
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed report: negative, non-finite or oversized field")
        try:
            public_key = self.ledger.authenticate(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        self._refuse_banned(request.peer_id, context)
        if not self.credit.signature_ok(request, public_key):
            self.credit.record_check_failure(request.peer_id, request.epoch, "report signature does not verify")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "report signature does not verify against this peer's key")
        try:
            fresh = self.ledger.record_report(
                request.peer_id, request.session, request.report_id, request.epoch, request.samples,
                request.loss, request.compute_seconds, dict(request.metrics),
            )
        except LedgerError as error:
            _abort(context, error)
        admitted = self.credit.record_report(request, public_key, self.config.micro_batch_size)
        for problem in admitted.problems:
            log.warning("report %s of peer %s failed a check: %s", request.report_id, request.peer_id, problem)
        if fresh:
            log.info("report %s: peer %s epoch %d, %d samples, loss %.4f",
                     request.report_id, request.peer_id, request.epoch, request.samples, request.loss)
        return pb.ReportReply(duplicate=not fresh)

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        if request.epoch < 0 or not math.isfinite(request.samples_per_second) or request.samples_per_second < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed heartbeat")
        self._refuse_banned(request.peer_id, context)
        # an epoch beyond what the run can have reached is a lie; it must not move the run's epoch
        epoch = min(request.epoch, self.credit.plausible_epoch())
        try:
            self.ledger.heartbeat(request.peer_id, request.session, epoch, request.samples_per_second)
        except LedgerError as error:
            _abort(context, error)
        state = self.ledger.snapshot(self.config.peer_timeout)
        return pb.HeartbeatReply(
            epoch=state["epoch"],
            live_peers=sum(p["alive"] for p in state["peers"]),
            swarm_samples_per_second=state["swarm_samples_per_second"],
            run_finished=self._run_finished(state["epoch"]),
            peers_behind=sum(
                p["alive"] and p["epoch"] < request.epoch and p["id"] != request.peer_id for p in state["peers"]
            ),
        )

    def Leave(self, request: pb.LeaveRequest, context):
        try:
            self.ledger.leave(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        log.info("peer %s left (%s)", request.peer_id, request.reason[:200] or "no reason given")
        return pb.LeaveReply()
