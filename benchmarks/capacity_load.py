"""One load-generator process of ``python -m benchmarks capacity``: many simulated peers, each as the real
peer's coordinator link behaves (peer/client.py), sharing one process.

Each simulated peer has its own Ed25519 identity and joins with the real ``peer.client.join`` (a
pinned-TLS channel, a signed Join). Then, like ``CoordinatorLink._run``, it makes one call at a time:
its due report first (built as ``CoordinatorLink.report`` builds it: a proof of one micro-batch via
``attach_proof``, signed with ``sign_report``), else a Heartbeat, the next one an interval after the
last reply; a report refused for now (NOT_YET) is sent again after the next interval, as the outbox
does. Every call goes through the real ``SignedStub`` (request signed over its exact bytes); its
channel hands back a future instead of blocking, so one thread can keep thousands of peers going.

Run by capacity.py as ``python -m benchmarks.capacity_load SPEC.json``. It writes ``joined`` (a JSON
file) once its peers are admitted, waits for the ``go`` file (when measuring starts and ends), and
writes ``result`` when the window is over: counts and latencies of the calls started in the window.
"""

from __future__ import annotations

import heapq
import json
import os
import queue
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SWARM_AUTH_KEY_BYTES = 294  # the size of the RSA public key (DER) a real peer sends; the coordinator only stores it
JOIN_THREADS = 4
SKETCH_DIMS = 64


class FutureChannel:
    """A channel whose calls return a grpc.Future rather than block: ``SignedStub.call`` signs and
    sends exactly as for a real peer, and the caller gets the future."""

    def __init__(self, channel):
        self.channel = channel

    def unary_unary(self, method, **kwargs):
        return self.channel.unary_unary(method, **kwargs).future


@dataclass
class SimPeer:
    index: int
    identity: object
    token: str
    peer_id: str = ""
    session: str = ""
    lists_version: str = ""
    epoch: int = 0  # the epoch it trains now: its next report
    next_report: float = 0.0
    pending: list = field(default_factory=list)  # reports not yet acknowledged, in order: epoch, then bytes
    busy: bool = False  # a call in flight: the link makes one at a time
    token_renewed: float = 0.0
    heartbeat_due: float = 0.0
    retry_at: float = 0.0  # a report refused for now is sent again from here on
    wake_at: float = 0.0


def swarm_id(rng: random.Random) -> str:
    """A hivemind peer id of the real length (``Qm`` + 44 base58 characters)."""
    return "Qm" + "".join(rng.choice(B58) for _ in range(44))


def sketch(rng: random.Random):
    from peer.sketch import Sketch

    projection = tuple(rng.gauss(0.0, 1.0) for _ in range(SKETCH_DIMS))
    return Sketch(sum(x * x for x in projection) ** 0.5, projection)


def report_request(peer: SimPeer, epoch: int, micro_batch_size: int, run_id: str, rng: random.Random):
    """A report of one micro-batch, with its proof and signature, as the real peer sends it."""
    from peer.report import attach_proof, sign_report
    from peer.work import EpochProof, MicroBatchResult
    from protos import coordinator_pb2 as pb

    request = pb.ReportRequest(peer_id=peer.peer_id, session=peer.session, report_id=uuid.uuid4().hex, epoch=epoch,
                               samples=micro_batch_size, loss=2.0, compute_seconds=0.5, metrics={"loss": 2.0})
    attach_proof(request, EpochProof(epoch, sketch(rng), "fp32",
                                     [MicroBatchResult(0, micro_batch_size, 2.0, sketch(rng))]))
    sign_report(request, run_id, peer.identity.private_key)
    return request


class Generator:
    def __init__(self, spec: dict):
        from peer.client import NOT_YET, SignedStub
        from peer.transport import Endpoint

        self.spec, self.not_yet = spec, NOT_YET
        self.rng = random.Random(spec["seed"])
        self.endpoint = Endpoint(spec["address"], spec["fingerprint"])
        self.channel = self.endpoint.open(30)  # opened first: the joins' channels share its connection
        self.stub_for = lambda identity: SignedStub(FutureChannel(self.channel), identity, spec["run_id"])
        self.peers = [SimPeer(spec["first"] + i, self._identity(), spec["tokens"][(spec["first"] + i) %
                                                                                 len(spec["tokens"])])
                      for i in range(spec["peers"])]
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.samples = {"Heartbeat": [], "Report": []}  # latency (s) of OK calls started in the window
        self.counts: dict[str, int] = {}
        self.window = (float("inf"), float("inf"))

    def _identity(self):
        from peer.identity import Identity

        return Identity(Ed25519PrivateKey.generate())

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    # --- joining ----------------------------------------------------------------------------------
    def join_all(self) -> dict:
        from peer.client import join
        from peer.errors import UserError
        from protos import coordinator_pb2 as pb

        def one(peer: SimPeer):
            rng = random.Random(peer.index)
            request = pb.JoinRequest(token=peer.token, public_key=peer.identity.public_bytes,
                                     hivemind_peer_id=swarm_id(rng), device="cpu", client_version="0.1.0",
                                     swarm_auth_key=rng.randbytes(SWARM_AUTH_KEY_BYTES))
            started = time.perf_counter()
            try:
                reply = join(self.endpoint, peer.identity, request, 60)
            except UserError as error:
                return None, str(error)
            peer.peer_id, peer.session = reply.peer_id, reply.session
            peer.lists_version, peer.epoch = reply.access_lists.version, reply.epoch
            peer.token_renewed = time.monotonic()
            return time.perf_counter() - started, None

        started = time.monotonic()
        with ThreadPoolExecutor(JOIN_THREADS) as pool:
            results = list(pool.map(one, self.peers))
        latencies = [r[0] for r in results if r[0] is not None]
        errors = [r[1] for r in results if r[1] is not None]
        return {"admitted": len(latencies), "refused": len(errors), "errors": errors[:5],
                "join_seconds": time.monotonic() - started, "join_latencies": latencies}

    # --- the steady state -------------------------------------------------------------------------
    def _send(self, peer: SimPeer, kind: str) -> None:
        from protos import coordinator_pb2 as pb

        stub = self.stub_for(peer.identity)
        if kind == "Report":  # built once and kept: a resend is the same report (the outbox keeps its bytes)
            if not isinstance(peer.pending[0], bytes):
                peer.pending[0] = report_request(peer, peer.pending[0], self.spec["micro_batch_size"],
                                                 self.spec["run_id"], self.rng).SerializeToString()
            request = pb.ReportRequest.FromString(peer.pending[0])
            future = stub.call("Report", request, pb.ReportReply, self.spec["call_timeout"])
        else:
            renew = time.monotonic() - peer.token_renewed > self.spec["access_token_ttl"] / 2
            request = pb.HeartbeatRequest(peer_id=peer.peer_id, session=peer.session, epoch=peer.epoch,
                                          samples_per_second=50.0, access_lists_version=peer.lists_version,
                                          renew_access_token=renew)
            future = stub.call("Heartbeat", request, pb.HeartbeatReply, self.spec["call_timeout"])
        peer.busy = True
        sent_at, started = time.monotonic(), time.perf_counter()
        future.add_done_callback(lambda f: self.done.put((peer, kind, sent_at, started, f, time.perf_counter())))

    def _finished(self, peer: SimPeer, kind: str, sent_at: float, started: float, future, ended: float) -> None:
        """Books one reply and what it changes for the peer (lists version, pending reports, next times)."""
        peer.busy = False
        now = time.monotonic()
        measured = self.window[0] <= sent_at < self.window[1]
        error = future.exception()
        if kind == "Heartbeat":
            peer.heartbeat_due = now + self.spec["interval"]
        if error is None:
            reply = future.result()
            if measured:
                self.samples[kind].append(ended - started)
                self.count(f"{kind}_ok")
            if kind == "Report":
                peer.pending.pop(0)
            else:
                if reply.access_token:
                    peer.token_renewed = now
                if reply.HasField("access_lists"):
                    peer.lists_version = reply.access_lists.version
                    self.count("lists_refreshed_in_window" if measured else "lists_refreshed_before")
            return
        code = error.code() if hasattr(error, "code") else None
        if kind == "Report":  # kept and sent again after an interval (the outbox), heartbeats go on
            peer.retry_at = now + self.spec["interval"]
        if measured:
            name = "not_yet" if code == self.not_yet else getattr(code, "name", type(error).__name__)
            self.count(f"{kind}_{name}")
            details = self.counts.setdefault("error_details", [])
            if code != self.not_yet and len(details) < 5:
                details.append(f"{kind}: {name}: {error.details() if hasattr(error, 'details') else error}")

    def _next(self, peer: SimPeer, now: float) -> str | float:
        """What ``peer`` does now ("Report", "Heartbeat"), or when it next wakes."""
        if peer.pending and now >= peer.retry_at:
            return "Report"
        if now >= peer.heartbeat_due:
            return "Heartbeat"
        return min(peer.heartbeat_due, peer.retry_at) if peer.pending else peer.heartbeat_due

    def _tick(self, now: float, reports: list, timers: list, schedule, epoch_seconds: float) -> None:
        while reports and reports[0][0] <= now:  # an epoch ends: the report is due, the link woken at once
            _, index, peer = heapq.heappop(reports)
            peer.pending.append(peer.epoch)
            peer.epoch += 1
            peer.next_report += epoch_seconds
            heapq.heappush(reports, (peer.next_report, index, peer))
            if not peer.busy and len(peer.pending) == 1:
                schedule(peer, now)
        while timers and timers[0][0] <= now:
            when, _, peer = heapq.heappop(timers)
            if when != peer.wake_at or peer.busy:
                continue  # superseded, or its reply will reschedule it
            action = self._next(peer, now)
            if isinstance(action, str):
                self._send(peer, action)
            else:
                schedule(peer, action)

    def run(self, go: Path) -> dict:
        """Heartbeats and reports until the window ends (read from ``go`` once it appears)."""
        interval, epoch_seconds = self.spec["interval"], self.spec["epoch_seconds"]
        live = [p for p in self.peers if p.session]
        timers: list = []  # (when, seq, peer): each peer's one valid timer is peer.wake_at
        seq = 0

        def schedule(peer: SimPeer, when: float) -> None:
            nonlocal seq
            seq += 1
            peer.wake_at = when
            heapq.heappush(timers, (when, seq, peer))

        now = time.monotonic()
        reports = []  # (when, index, peer): each peer's next end of an epoch
        for peer in live:  # heartbeats spread over one interval, reports over one epoch: no lockstep
            peer.next_report = now + self.rng.uniform(0, epoch_seconds)
            heapq.heappush(reports, (peer.next_report, peer.index, peer))
            peer.heartbeat_due = now + self.rng.uniform(0, interval)
            schedule(peer, peer.heartbeat_due)
        end, looked = None, 0.0
        while True:
            now = time.monotonic()
            if end is None and now - looked > 0.2:
                looked = now
                if go.exists():
                    window = json.loads(go.read_text())
                    offset = now - time.time()  # the parent's wall-clock times, on this process's clock
                    self.window = (window["start"] + offset, window["end"] + offset)
                    end = self.window[1]
            if end is not None and now >= end:  # the window is over: no new calls, wait for the last replies
                if not any(p.busy for p in live) or now >= end + self.spec["call_timeout"] + 1:
                    break
            else:
                self._tick(now, reports, timers, schedule, epoch_seconds)
            wait = min(timers[0][0] - now, 0.05) if timers else 0.05
            try:
                item = self.done.get(timeout=max(0.0, wait))
            except queue.Empty:
                continue
            while item is not None:
                self._finished(*item)
                schedule(item[0], time.monotonic())
                try:
                    item = self.done.get_nowait()
                except queue.Empty:
                    item = None
        self.channel.close()
        return {"counts": self.counts, "heartbeat_latencies": self.samples["Heartbeat"],
                "report_latencies": self.samples["Report"], "pid": os.getpid(),
                "pending_reports_at_end": sum(len(p.pending) for p in live)}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    control = Path(spec["control"])
    generator = Generator(spec)
    joined = generator.join_all()
    (control / f"joined-{spec['name']}.json").write_text(json.dumps(joined))
    result = generator.run(control / "go.json")
    result["joined"] = joined["admitted"]
    tmp = control / f"result-{spec['name']}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(control / f"result-{spec['name']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
