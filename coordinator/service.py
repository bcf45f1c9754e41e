"""The gRPC service peers talk to: Join, Report, Heartbeat, Leave.

Every handler validates its input, turns ledger refusals into gRPC status codes with a message a
volunteer can act on, and never lets a bad request take the server down.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import grpc

from coordinator.books.binding import Binding, malformed, run_binding
from coordinator.books.credit import Credit
from coordinator.books import reports
from coordinator import tokens
from coordinator.checkpoints import find_checkpoint, latest_checkpoint, read_checkpoint_bytes
from coordinator.books.ledger import Ledger, LedgerError
from coordinator.probe import probe_requester
from coordinator.books.run_epoch import EpochRule
from peer.client import NOT_YET
from peer.identity import Identity, peer_id_of
from peer.runconfig import RunConfig
from peer.swarm_access import issue_access_token
from protos import coordinator_pb2 as pb
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("potluck.coordinator")

MAX_METRICS = 32
MAX_SWARM_AUTH_KEY = 1024  # an RSA public key in DER is ~300 bytes
CHECKPOINT_CHUNK_BYTES = 512 * 1024  # well under the 1 MiB message limit
PROBE_TIMEOUT = 3.0  # seconds to connect back to a requester's address and read its greeting


def _abort(context: grpc.ServicerContext, error: LedgerError):
    context.abort(getattr(grpc.StatusCode, error.code), str(error))


def access_lists(ledger: Ledger) -> pb.AccessLists:
    version, allow, deny = ledger.swarm_lists()
    return pb.AccessLists(version=version, allow=allow, deny=deny)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, ledger: Ledger, config: RunConfig, initial_peers: list[str], identity: Identity,
                 data_dir: Path | None = None, credit: Credit | None = None, binding: Binding | None = None,
                 on_admitted=None):
        self.data_dir = data_dir  # where checkpoints live; None: no checkpoints
        # on_admitted(): brings the bootstrap DHT node's access lists up to date before Join replies
        self.on_admitted = on_admitted
        self.ledger = ledger
        self.config = config
        ledger.epoch_rule = EpochRule.of(config)  # reports and heartbeats advance the checked run epoch
        self.initial_peers = initial_peers
        self.identity = identity
        self.credit = credit or Credit(ledger.target, config.verification, config.run_id,
                                       proof_required=config.averaging.strategy == "sync")
        binding = binding or run_binding(config)
        if binding is not None:
            self.credit.use_binding(binding)
        # a ban (failed audits, forged reports) evicts the peer in its own transaction (Credit.ban): session
        # refused, swarm access withdrawn; this process's heartbeats then re-check the voters
        self.credit.on_ban = lambda peer_id, reason: ledger.note_eviction()

    def _access_token(self, hivemind_peer_id: str, swarm_auth_key: bytes) -> bytes:
        return issue_access_token(
            self.identity.private_key, hivemind_peer_id, swarm_auth_key, self.config.access_token_ttl
        ).SerializeToString()

    def _run_finished(self, epoch: int) -> bool:
        return self.config.epochs > 0 and epoch >= self.config.epochs

    def Join(self, request: pb.JoinRequest, context):
        if len(request.public_key) != 32:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "public_key must be a 32-byte Ed25519 key")
        if not request.hivemind_peer_id or len(request.hivemind_peer_id) > 128 or len(request.device) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hivemind_peer_id (1-128 chars) and device (<=64) required")
        if not 0 < len(request.swarm_auth_key) <= MAX_SWARM_AUTH_KEY:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "swarm_auth_key required (the DHT's request-signing key)")
        peer_id = peer_id_of(request.public_key)
        try:
            claims = tokens.decode(request.token, self.identity.public_bytes)
        except tokens.TokenError as error:
            log.info("refused join of %s: %s", peer_id, error)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        if claims.run_id != self.config.run_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"this token is for run '{claims.run_id}', not '{self.config.run_id}'")
        try:
            admission = self.ledger.admit(
                claims, peer_id, request.public_key, request.hivemind_peer_id, request.device,
                request.swarm_auth_key, live_within=self.config.peer_timeout,
            )
        except LedgerError as error:
            log.info("refused join of %s: %s", peer_id, error)
            _abort(context, error)
        log.info("admitted peer %s (org %s, %s)", peer_id, admission.org, request.device)
        if self.on_admitted is not None:
            try:
                self.on_admitted()  # admission is in effect at the bootstrap node before the peer hears of it
            except Exception:  # a busy ledger: the keeper's 1 s tick carries it, the peer's bootstrap retries
                log.exception("could not push the access lists to the DHT node at join")
        reply = pb.JoinReply(
            peer_id=peer_id,
            session=admission.session,
            org=admission.org,
            run_id=self.config.run_id,
            run_config_toml=self.config.text,
            run_config_hash=self.config.config_hash,
            initial_peers=self.initial_peers,
            epoch=self.ledger.run_epoch(),
            coordinator_public_key=self.identity.public_bytes,
            access_token=self._access_token(request.hivemind_peer_id, request.swarm_auth_key),
            access_lists=access_lists(self.ledger),
        )
        others_alive = self.ledger.others_alive(peer_id, self.config.peer_timeout)
        reply.swarm_empty = not others_alive
        checkpoint = latest_checkpoint(self.data_dir) if self.data_dir is not None else None
        if checkpoint is not None and checkpoint.run_id == self.config.run_id:
            reply.checkpoint_epoch = checkpoint.epoch
            reply.checkpoint_sha256 = checkpoint.sha256
            reply.checkpoint_bytes = checkpoint.bytes
            # with a live swarm the newcomer loads state from its peers; with none it resumes from disk
            reply.start_from_checkpoint = not others_alive
        return reply

    def CheckpointFetch(self, request: pb.CheckpointFetchRequest, context):
        """One chunk of a checkpoint's bytes (unary, so the signed-request interceptor checks every call)."""
        try:
            self.ledger.authenticate(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        manifest = find_checkpoint(self.data_dir, request.sha256) if self.data_dir is not None else None
        if manifest is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such checkpoint (a newer one replaced it); join again")
        if not 0 <= request.offset < max(manifest.bytes, 1):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset must be in [0, {manifest.bytes})")
        data = read_checkpoint_bytes(self.data_dir, manifest)
        if request.offset == 0:
            log.info("sending checkpoint epoch %d (%d bytes) to %s", manifest.epoch, len(data), request.peer_id)
        return pb.CheckpointChunk(offset=request.offset,
                                  data=data[request.offset:request.offset + CHECKPOINT_CHUNK_BYTES])

    def StatusProbe(self, request: pb.StatusProbeRequest, context):
        """Dial back the address this request came from, at the port named; say whether the peer's nonce
        greeting answered. Only admitted peers may ask (signed request, valid session); the coordinator
        dials no other host, sends nothing, and returns no bytes it read (coordinator/probe.py)."""
        try:
            self.ledger.authenticate(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        if not request.host or len(request.host) > 255 or not 0 < request.port < 65536 or \
                not 0 < len(request.nonce) <= 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "probe needs a host, a port in 1-65535 and a nonce")
        result = probe_requester(context.peer(), request.host, request.port, request.nonce, PROBE_TIMEOUT)
        if not result.greeted:
            log.info("peer %s is not reachable at %s:%d: %s", request.peer_id, request.host, request.port,
                     result.detail)
        return pb.StatusProbeReply(connected=result.connected, greeted=result.greeted, detail=result.detail)

    def Report(self, request: pb.ReportRequest, context):
        bad = (  # an impossible epoch (negative or too far ahead) is judged below, once the sender is known
            request.samples < 0
            or not math.isfinite(request.loss)
            or not math.isfinite(request.compute_seconds)
            or not 0 < len(request.report_id) <= 64
            or len(request.metrics) > MAX_METRICS
            or not all(math.isfinite(v) and len(k) <= 64 for k, v in request.metrics.items())
        )
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed report: negative, non-finite or oversized field")
        if problem := malformed(request):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed report: {problem}")
        try:
            public_key = self.ledger.authenticate(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        if not self.credit.signature_ok(request, public_key):
            self.credit.record_check_failure(request.peer_id, request.epoch, "report signature does not verify")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "report signature does not verify against this peer's key")
        verdict = self.ledger.judge_report_epoch(request.peer_id, request.epoch)
        if verdict.refused:  # a claim the run cannot have reached: refused, and it moves nothing
            log.warning("refused report %s of peer %s: %s", request.report_id, request.peer_id, verdict.reason)
            if verdict.evidence:
                self.credit.record_check_failure(request.peer_id, request.epoch, verdict.reason)
                context.abort(grpc.StatusCode.OUT_OF_RANGE, f"report refused: {verdict.reason}")
            # an honest peer ahead of a stalled quorum (or of a coordinator that was down): its outbox
            # keeps the report and sends it again once the run's epoch has caught up (NOT_YET: the
            # coordinator is reachable, so the peer's heartbeats go on)
            context.abort(NOT_YET, f"report not yet accepted, retry later: {verdict.reason}")
        try:  # one transaction: the report is in the books whole, or not at all (the peer sends it again)
            recorded = reports.record(self.ledger, self.credit, request, public_key, self.config.micro_batch_size)
        except LedgerError as error:
            _abort(context, error)
        for problem in recorded.problems:
            log.warning("report %s of peer %s failed a check: %s", request.report_id, request.peer_id, problem)
        if recorded.fresh:
            log.info("report %s: peer %s epoch %d, %d samples, loss %.4f",
                     request.report_id, request.peer_id, request.epoch, request.samples, request.loss)
        return pb.ReportReply(duplicate=not recorded.fresh)

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        if request.epoch < 0 or not math.isfinite(request.samples_per_second) or request.samples_per_second < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed heartbeat")
        if len(request.access_lists_version) > 64:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed heartbeat")
        # an epoch beyond what the run can have reached is a lie; it must not move the run's epoch
        epoch = min(request.epoch, self.credit.plausible_epoch())
        try:
            peer = self.ledger.heartbeat(request.peer_id, request.session, epoch, request.samples_per_second)
        except LedgerError as error:
            _abort(context, error)
        # O(1) in the run's size: the swarm figures are a summary at most a second old, the epoch, lists
        # version and this peer's own account are read by key
        summary = self.ledger.run_summary(self.config.peer_timeout)
        run_epoch = self.ledger.run_epoch()
        lists_version = self.ledger.swarm_lists()[0]
        account = self.ledger.accounts(request.peer_id).get(request.peer_id)
        return pb.HeartbeatReply(
            credit=account.credit if account else 0.0,
            credit_verified=bool(account and account.credit_verified),
            audits_passed=account.audits_passed if account else 0,
            audits_failed=account.audits_failed if account else 0,
            samples_recorded=self.ledger.reported_samples(request.peer_id),
            access_token=(
                self._access_token(peer["hivemind_peer_id"], peer["swarm_auth_key"])
                if request.renew_access_token else b""
            ),
            # the lists themselves (O(peers) bytes) only when the peer's copy is out of date
            access_lists=access_lists(self.ledger) if lists_version != request.access_lists_version else None,
            epoch=run_epoch,
            live_peers=summary.live_count(request.peer_id),
            swarm_samples_per_second=summary.swarm_samples_per_second,
            run_finished=self._run_finished(run_epoch),
            peers_behind=summary.peers_behind(request.epoch, request.peer_id),
        )

    def Leave(self, request: pb.LeaveRequest, context):
        try:
            self.ledger.leave(request.peer_id, request.session)
        except LedgerError as error:
            _abort(context, error)
        log.info("peer %s left (%s)", request.peer_id, request.reason[:200] or "no reason given")
        return pb.LeaveReply()
