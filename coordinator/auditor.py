"""The auditor: a process owned by `coordinator serve` that checks a random sample of the work.

It joins the swarm as a client (no compute, no averaging), keeps the swarm's parameters at epochs
it chose secretly in advance, and, when a report arrives, draws *then* which micro-batches to
replay (so a peer cannot know which ones will be checked). Replays go through peer/work.py, the
same code a peer trains with. New peers are audited at ``audit_rate_new``, established ones at
``audit_rate``, and every peer at least ``audit_floor`` times per window. It also watches the
swarm's progress records and bans a peer that publishes an epoch the run cannot have reached
(HIVEMIND_NOTES trap 4), and settles credit window by window.

The unit of work is one micro-batch in the synchronous mode. In DiLoCo mode the unit would be a
whole inner phase (many local steps from one snapshot): the same Replayer runs the phase from the
parameters at its start and compares the sketch of the resulting delta, at a lower rate; this
module only implements the synchronous mode so far.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from pathlib import Path

from coordinator.credit import INCONCLUSIVE, PASS, Credit
from coordinator.replay import Replayer, judge, tolerance_for
from peer.runconfig import RunConfig, VerificationConfig
from peer.sketch import Sketch

log = logging.getLogger("potluck.auditor")

POLL = 0.3  # seconds between looks at the swarm and the ledger
REPORT_QUORUM_WAIT = 20.0  # seconds a lone report waits for peers' reports of its epoch (snapshot check)
QUIET_BEFORE_FINAL_SETTLEMENT = 5.0
MAX_SNAPSHOTS = 64
RECHECKS = 2  # extra micro-batches replayed after an inconclusive one


class AuditPolicy:
    """Secret, unpredictable choices: which epochs to snapshot and which micro-batches to replay."""

    def __init__(self, v: VerificationConfig, rng: random.Random | None = None):
        self.v = v
        self.rng = rng or secrets.SystemRandom()
        self._snapshot_epochs: dict[int, bool] = {}

    def snapshot_epoch(self, epoch: int) -> bool:
        if epoch not in self._snapshot_epochs:
            self._snapshot_epochs[epoch] = self.rng.random() < self.v.snapshot_rate
        return self._snapshot_epochs[epoch]

    def rate(self, established: bool, suspicious: bool) -> float:
        return self.v.audit_rate if established and not suspicious else self.v.audit_rate_new

    def choose(self, micro_batches: int, rate: float, flagged: list[int]) -> list[int]:
        chosen = {i for i in range(micro_batches) if self.rng.random() < rate}
        return sorted(chosen | {i for i in flagged if 0 <= i < micro_batches})


class Auditor:
    """The audit logic, independent of where parameters come from (``snapshots``: epoch -> tensors)."""

    def __init__(self, config: RunConfig, task, credit: Credit, policy: AuditPolicy | None = None):
        self.config, self.credit = config, credit
        self.policy = policy or AuditPolicy(config.verification)
        self.replayer = Replayer(task, config)
        self.snapshots: dict[int, list] = {}
        self._loaded_epoch: int | None = None
        self._fingerprints: dict[int, Sketch] = {}

    def add_snapshot(self, epoch: int, parameters: list) -> None:
        self.snapshots[epoch] = parameters
        for old in sorted(self.snapshots)[:-MAX_SNAPSHOTS]:
            del self.snapshots[old]

    def _load(self, epoch: int) -> None:
        if self._loaded_epoch != epoch:
            self.replayer.load(self.snapshots[epoch])
            self._loaded_epoch = epoch
            self._fingerprints[epoch] = self.replayer.fingerprint(epoch)

    def _snapshot_trusted(self, epoch: int) -> bool:
        """The snapshot came from one peer: trust it only if most reports of the epoch started there too."""
        reports = self.credit.reports_of_epoch(epoch)
        tolerance = self.config.verification.fp32_tolerance
        matching = sum(
            judge(Sketch(b["parameters"]["norm"], tuple(b["parameters"]["projection"])), self._fingerprints[epoch],
                  tolerance).verdict == PASS
            for b in (json.loads(row["body"]) for row in reports))
        return matching * 2 > len(reports)

    def ready(self, row, now: float | None = None) -> bool:
        """Whether a report can be judged now (its epoch's snapshot can be cross-checked)."""
        now = time.time() if now is None else now
        return row["epoch"] not in self.snapshots or len(self.credit.reports_of_epoch(row["epoch"])) >= 2 or \
            now - row["received"] > REPORT_QUORUM_WAIT

    def audit_report(self, row, extra: int = 0) -> list[str]:
        """Judge one report: its parameter fingerprint, then a random sample of its micro-batches."""
        epoch, peer_id, claim = row["epoch"], row["peer_id"], json.loads(row["body"])
        if epoch not in self.snapshots:
            self.credit.mark_report(row["report_id"], "unaudited")
            return []
        self._load(epoch)
        fingerprint = self.replayer.check_parameters(claim, self.config.verification.fp32_tolerance)
        if fingerprint.verdict != PASS:
            if not self._snapshot_trusted(epoch):
                self.credit.mark_report(row["report_id"], "unaudited")
                return []
            # an honest peer can miss an averaging round (or land in another group) and start an epoch
            # elsewhere: not punishable, but its work there cannot be verified (see Credit._settle_one)
            self.credit.record_audit(row["report_id"], peer_id, epoch, -1, INCONCLUSIVE, fingerprint.relative_error,
                                     fingerprint.norm_ratio, f"parameters differ from the swarm's: {fingerprint.reason}")
            self.credit.mark_report(row["report_id"], "done")
            return [fingerprint.verdict]
        flags = json.loads(row["flags"])
        established = self.credit.passed_audits(peer_id) >= self.config.verification.established_after
        count = len(claim["sketches"])
        chosen = self.policy.choose(count, self.policy.rate(established, bool(flags["report"])),
                                    flags["micro_batches"])
        if extra:
            rest = [i for i in range(count) if i not in chosen]
            chosen += self.policy.rng.sample(rest, min(extra, len(rest)))
        verdicts = self._replay(row, claim, chosen)
        if INCONCLUSIVE in verdicts:
            rest = [i for i in range(count) if i not in chosen]
            verdicts += self._replay(row, claim, self.policy.rng.sample(rest, min(RECHECKS, len(rest))))
        self.credit.mark_report(row["report_id"], "done")
        return verdicts

    def _replay(self, row, claim: dict, micro_batches: list[int]) -> list[str]:
        tolerance = tolerance_for(self.config, claim["compute_dtype"])
        verdicts = []
        for index in micro_batches:
            verdict = self.replayer.audit(claim, index, tolerance)
            self.credit.record_audit(row["report_id"], row["peer_id"], row["epoch"], index, verdict.verdict,
                                     verdict.relative_error, verdict.norm_ratio, verdict.reason)
            verdicts.append(verdict.verdict)
            if self.credit.banned_reason(row["peer_id"]):
                break
        return verdicts

    def top_up(self, window: int) -> None:
        """Audit peers below the floor in a closed window, from the epochs whose snapshots we kept."""
        v = self.config.verification
        lo, hi = window * v.window_epochs, (window + 1) * v.window_epochs
        reports = [row for epoch in range(lo, hi) if epoch in self.snapshots
                   for row in self.credit.reports_of_epoch(epoch) if row["audit_state"] == "done"]
        for peer_id in {row["peer_id"] for row in reports}:
            deficit = v.audit_floor - self.credit.audits_in_window(peer_id, window)
            own = [row for row in reports if row["peer_id"] == peer_id]
            for _ in range(max(0, deficit)):
                if self.credit.banned_reason(peer_id):
                    break
                row = self.policy.rng.choice(own)
                claim = json.loads(row["body"])
                self._load(row["epoch"])
                self._replay(row, claim, [self.policy.rng.randrange(len(claim["sketches"]))])

    def settle(self, run_epoch: int, final: bool) -> None:
        v = self.config.verification
        closable = run_epoch + (v.window_epochs if final else 0)
        for window in range(max(0, closable // v.window_epochs - 2), closable // v.window_epochs):
            if (window + 1) * v.window_epochs < closable:
                self.top_up(window)
        self.credit.settle(closable)


def run_auditor(run_path: Path, data_dir: Path, initial_peers: list[str], stop=None) -> None:
    """The auditor process's main loop (until SIGTERM)."""
    import threading

    from coordinator.ledger import BANNED, LEDGER_FILE, Ledger
    from coordinator.server import KEY_FILE
    from coordinator.swarm_watch import StateDownloader, SwarmPass, read_progress, start_watch_dht
    from peer.identity import load_or_create_identity
    from peer.runconfig import load_run_config
    from peer.task import load_task

    config = load_run_config(run_path)
    ledger = Ledger(Path(data_dir) / LEDGER_FILE)
    credit = Credit(ledger.path, config.verification, config.run_id,
                    proof_required=config.averaging.strategy == "sync")
    # a ban is an eviction: the session is refused, the token and swarm access withdrawn
    credit.on_ban = lambda peer_id, reason: ledger.evict(peer_id, f"{BANNED}: {reason}")
    swarm_pass = SwarmPass(data_dir, ledger, load_or_create_identity(data_dir, KEY_FILE), config.access_token_ttl)
    stop = stop or threading.Event()
    try:
        task = load_task(config.task_name, config.task_version)
    except Exception as error:  # the coordinator may lack the task: cheap checks still run, audits do not
        log.error("auditor cannot replay work: %s", error)
        task = None
    dht = start_watch_dht(initial_peers, config.run_id, swarm_pass)
    auditor = Auditor(config, task, credit) if task is not None else None
    if auditor is not None:
        credit.flops_per_sample = 6.0 * auditor.replayer.parameter_count
        downloader = StateDownloader(dht, config.run_id, [p.detach() for p in auditor.replayer.model.parameters()])
    suspects: dict[str, int] = {}
    attempted: set[int] = set()
    print("auditor ready", flush=True)
    while not stop.is_set():
        swarm_pass.refresh()
        limit = credit.plausible_epoch()
        entries = [e for e in read_progress(dht, config.run_id) if not e.client_mode]
        liars = {e.hivemind_peer_id: e.epoch for e in entries if e.epoch > limit}
        for swarm_id, epoch in liars.items():
            suspects[swarm_id] = suspects.get(swarm_id, 0) + 1
            peer_id = credit.peer_of_swarm_id(swarm_id)
            if peer_id and suspects[swarm_id] >= 2 and credit.ban(
                    peer_id, f"epoch lie: published epoch {epoch} in the swarm, the run is at most at {limit}"):
                log.warning("banned %s: epoch lie (%d > %d)", peer_id, epoch, limit)
        suspects = {k: v for k, v in suspects.items() if k in liars}
        honest = [e.epoch for e in entries if e.epoch <= limit]
        if auditor is not None:
            swarm_epoch = max(honest, default=None)
            if swarm_epoch is not None and swarm_epoch not in attempted and auditor.policy.snapshot_epoch(swarm_epoch):
                attempted.add(swarm_epoch)
                got = downloader.download()
                if got is not None and got[0] not in auditor.snapshots:
                    auditor.add_snapshot(*got)
            for row in credit.reports_to_audit():
                if not credit.banned_reason(row["peer_id"]) and auditor.ready(row):
                    auditor.audit_report(row)
                elif credit.banned_reason(row["peer_id"]):
                    credit.mark_report(row["report_id"], "unaudited")
            run_epoch = credit.run_epoch()
            final = bool(config.epochs) and run_epoch >= config.epochs and credit.quiet_for(
                QUIET_BEFORE_FINAL_SETTLEMENT)
            auditor.settle(run_epoch, final)
        stop.wait(POLL)
    dht.shutdown()


def main() -> None:
    """`python -m coordinator.auditor RUN DATA_DIR MADDR...`: started by `coordinator serve`."""
    import os
    import signal
    import sys
    import threading

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s auditor %(message)s")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
    import torch

    torch.set_num_threads(1)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    run_auditor(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:], stop)


if __name__ == "__main__":
    main()
