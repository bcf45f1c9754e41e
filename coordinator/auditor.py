"""The auditor: a process owned by `coordinator serve` that checks a random sample of the work.

It joins the swarm as a client (no compute, no averaging) and keeps the swarm's parameters as it
sees them epoch by epoch. A report names the parameters it started from only by a fingerprint
(seeded by the report's own epoch label), and labels drift between honest peers (one can train in
lockstep one label behind another), so a report is matched to the snapshot whose *fingerprint*
equals its own, whatever that snapshot's label; a report that matches none is never judged (it
cannot be failed, and is not paid). After a report arrives the auditor draws *then* which
micro-batches to replay (its share of the window's audits, so a peer cannot know which ones), and
when the window closes it tops the audits up until the window reaches the detection confidence of
``[verification]`` (coordinator/confidence.py). Replays go through peer/work.py, the same code a
peer trains with. It also watches the swarm's progress records and bans a peer that publishes an
epoch the run cannot have reached (HIVEMIND_NOTES trap 4), and settles credit window by window.

The unit of work is one micro-batch in the synchronous mode. In DiLoCo mode it is one inner step:
the snapshots are the swarm's anchors (the DiLoCo state averager's, labelled by the run's epoch, as
no DiLoCo peer publishes hivemind progress), a report's fingerprint names the anchor its phase
started from, and step j is judged by re-running steps 0..j from that anchor
(coordinator/phase_replay.py; only the ``replayable_steps`` can be drawn). Matching, the confidence
rule, verdicts, strikes and settlement are the same as in the synchronous mode.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import time
from pathlib import Path

from coordinator.confidence import required_audits
from coordinator.books.credit import AUDITABLE, FAIL, INCONCLUSIVE, PASS, Credit
from coordinator.phase_replay import replay_phase, replayable_steps
from coordinator.replay import Replayer, Verdict, judge, tolerance_for
from peer.runconfig import RunConfig, VerificationConfig
from peer.sketch import Sketch, count_sketch, parameter_seed

log = logging.getLogger("potluck.auditor")

POLL = 0.3  # seconds between looks at the swarm and the ledger
AUDITOR_LOCK = "auditor.lock"  # in the data dir: held by the one auditor of its ledger for its lifetime
REPORT_QUORUM_WAIT = 20.0  # seconds a lone report waits for peers' reports of its epoch (snapshot check)
QUIET_BEFORE_FINAL_SETTLEMENT = 5.0
MAX_SNAPSHOTS = 64
# epochs a peer's published progress may run ahead of its own reports before it is an epoch lie (an
# epoch past the run's last is one at once): peers ignore records beyond the coordinator's epoch + 1
# anyway (peer/progress_guard.py), so a small lie is harmless, while banning one banned an honest lone
# peer whose reports waited for a stalled quorum (measured: 40 epochs ahead in a 200-epoch run)
LIE_MARGIN = 100
MAX_PHASES = 64  # replayed DiLoCo phases kept (a top-up draws one step at a time from the same report)
SNAPSHOT_TRIES = 3  # downloads of one epoch's parameters before the auditor gives up on it
RECHECKS = 2  # extra micro-batches replayed after an inconclusive one
SNAPSHOT_TIMEOUT = 20.0  # seconds for one download of the swarm's state (the loop waits meanwhile)
# A report's parameters must equal a snapshot's, not be near it: averaged parameters are the same
# bits on every peer (only summation order in the sketch differs, ~1e-7), while parameters one step
# apart can differ by less than 1e-3 late in a run and still give gradients 25% apart.
PARAMETER_MATCH = 1e-5


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
        """``ceil(rate * micro_batches)`` micro-batches drawn without replacement, plus the flagged ones."""
        count = min(micro_batches, math.ceil(round(rate * micro_batches, 9)))
        chosen = set(self.rng.sample(range(micro_batches), count))
        return sorted(chosen | {i for i in flagged if 0 <= i < micro_batches})


def arrival_share(v: VerificationConfig, micro_batches: int, established: bool, suspicious: bool) -> float:
    """The share of a report replayed on arrival: its part of the audits a window of such reports needs
    (so most windows reach their confidence without a top-up), at least the new/established rate."""
    expected = micro_batches * v.window_epochs
    rate = v.audit_rate if established and not suspicious else v.audit_rate_new
    return max(required_audits(v, expected) / max(expected, 1), rate)


class Auditor:
    """The audit logic, independent of where parameters come from (``snapshots``: label -> tensors)."""

    def __init__(self, config: RunConfig, task, credit: Credit, policy: AuditPolicy | None = None):
        self.config, self.credit = config, credit
        self.policy = policy or AuditPolicy(config.verification)
        self.replayer = Replayer(task, config)
        self.snapshots: dict[int, dict] = {}  # the epoch label it was served under -> the swarm's state_dict
        self._loaded_epoch: int | None = None
        self._fingerprints: dict[tuple[int, int], Sketch] = {}  # (snapshot label, seed label) -> fingerprint
        self._claimed: dict[str, Sketch] = {}  # report id -> the parameter fingerprint it reports
        self._matched: dict[str, int] = {}  # report id -> label of the snapshot holding its parameters
        self._exhausted: set[tuple[str, int]] = set()  # (peer, window)s whose top-up ran out of replayable micro-batches
        self._names = [name for name, _ in self.replayer.model.named_parameters()]
        self.diloco = config.averaging.strategy == "diloco"
        self._phases: dict[tuple[str, int], list] = {}  # (report id, snapshot label) -> replayed steps 0..j

    def add_snapshot(self, epoch: int, state_dict: dict) -> None:
        self.snapshots[epoch] = state_dict
        for old in sorted(self.snapshots)[:-MAX_SNAPSHOTS]:
            del self.snapshots[old]
            self._fingerprints = {key: f for key, f in self._fingerprints.items() if key[0] != old}
            if self._loaded_epoch == old:
                self._loaded_epoch = None

    def _load(self, epoch: int) -> None:
        if self._loaded_epoch != epoch:
            self.replayer.load(self.snapshots[epoch])
            self._loaded_epoch = epoch

    # --- which parameters a report started from ----------------------------------------------
    def _fingerprint(self, label: int, seed_label: int) -> Sketch:
        """The snapshot ``label``'s fingerprint as a peer labelling its epoch ``seed_label`` computes it."""
        key = (label, seed_label)
        if key not in self._fingerprints:
            state = self.snapshots[label]
            self._fingerprints[key] = count_sketch([state[name] for name in self._names],
                                                   parameter_seed(self.config.seed, seed_label),
                                                   self.config.verification.sketch_dims)
        return self._fingerprints[key]

    def _claim(self, row) -> Sketch:
        if row["report_id"] not in self._claimed:
            parameters = json.loads(row["body"])["parameters"]
            self._claimed[row["report_id"]] = Sketch(parameters["norm"], tuple(parameters["projection"]))
        return self._claimed[row["report_id"]]

    def _equal(self, row, label: int) -> bool:
        verdict = judge(self._claim(row), self._fingerprint(label, row["epoch"]), PARAMETER_MATCH)
        return verdict.verdict == PASS

    def _near(self, epoch: int) -> list[int]:
        """Snapshot labels a report labelled ``epoch`` may have started from (labels drift by up to the slack)."""
        slack = self.config.verification.epoch_slack
        return sorted((label for label in self.snapshots if abs(label - epoch) <= slack),
                      key=lambda label: (abs(label - epoch), label))

    def match(self, row) -> int | None:
        """The label of a snapshot whose parameters are the report's (by fingerprint), or None."""
        report_id = row["report_id"]
        if report_id in self._matched and self._matched[report_id] in self.snapshots:
            return self._matched[report_id]
        for label in self._near(row["epoch"]):
            if self._equal(row, label):
                self._matched[report_id] = label
                return label
        return None

    def _trusted(self, label: int, row) -> bool:
        """A snapshot came from one peer: trust it for a report if at least half the peers reporting the
        report's label started from its parameters (in the lockstep case, the peer one label behind is
        half of its label's reporters, so one fingerprint per label and snapshot suffices)."""
        reports = self.credit.reports_of_epoch(row["epoch"])
        holders = {r["peer_id"] for r in reports if self._equal(r, label)}
        return len(holders) * 2 >= len({r["peer_id"] for r in reports})

    def ready(self, row, now: float | None = None) -> bool:
        """Whether a report can be judged now: a snapshot holds its parameters and other peers' reports of
        its label are in (to cross-check that snapshot), or it waited long enough for either."""
        now = time.time() if now is None else now
        if now - row["received"] > REPORT_QUORUM_WAIT:
            return True
        return self.match(row) is not None and len(self.credit.reports_of_epoch(row["epoch"])) >= 2

    # --- judging ------------------------------------------------------------------------------
    def audit_report(self, row, extra: int = 0) -> list[str]:
        """Judge one report: find the snapshot holding its parameters, then replay its share of the window's audits."""
        peer_id, claim = row["peer_id"], json.loads(row["body"])
        if not self._near(row["epoch"]):
            self.credit.mark_report(row["report_id"], "unaudited")
            return []
        label = self.match(row)
        if label is None or not self._trusted(label, row):
            # an honest peer can miss an averaging round and start an epoch elsewhere, or the snapshot
            # holding its parameters was not kept: nothing to judge against, so never a failure; its
            # micro-batches cannot be replayed, so they are not paid either (see Credit._settle_one)
            why = "match no snapshot the auditor holds" if label is None else "match only an untrusted snapshot"
            self.credit.record_audit(row["report_id"], peer_id, row["epoch"], -1, INCONCLUSIVE, None, None,
                                     f"parameters {why}: not auditable")
            self.credit.mark_report(row["report_id"], "other-parameters")
            return [INCONCLUSIVE]
        flags = json.loads(row["flags"])
        count = self.replayable(claim)
        if count == 0:  # an overlapped DiLoCo phase starts where no one else has been: nothing to replay
            self.credit.mark_report(row["report_id"], "unaudited")
            return []
        chosen = self.policy.choose(count, self.arrival_share(count, peer_id, bool(flags["report"])),
                                    flags["micro_batches"])
        if extra:
            rest = [i for i in range(count) if i not in chosen]
            chosen += self.policy.rng.sample(rest, min(extra, len(rest)))
        verdicts = self._replay(row, claim, chosen, label)
        if INCONCLUSIVE in verdicts:
            rest = [i for i in range(count) if i not in chosen]
            verdicts += self._replay(row, claim, self.policy.rng.sample(rest, min(RECHECKS, len(rest))), label)
        self.credit.mark_report(row["report_id"], AUDITABLE)
        return verdicts

    def replayable(self, claim: dict) -> int:
        """How many leading micro-batches (DiLoCo: inner steps) of a report can be drawn for a replay."""
        return replayable_steps(self.config, claim) if self.diloco else len(claim["sketches"])

    def arrival_share(self, micro_batches: int, peer_id: str, suspicious: bool) -> float:
        v = self.config.verification
        return arrival_share(v, micro_batches, self.credit.passed_audits(peer_id) >= v.established_after,
                             suspicious)

    def _phase(self, row, claim: dict, label: int, upto: int) -> list:
        """DiLoCo: steps 0..upto (at least) of the report's phase replayed from the anchor ``label``."""
        key = (row["report_id"], label)
        if len(self._phases.get(key, [])) <= upto:
            self._phases.pop(key, None)
            self._phases[key] = replay_phase(self.replayer.task, self.config, self.snapshots[label], claim, upto)
            for old in list(self._phases)[:-MAX_PHASES]:
                del self._phases[old]
        return self._phases[key]

    def _judge_step(self, claim: dict, index: int, done, tolerance: float) -> Verdict:
        entry = claim["sketches"][index]
        if entry["samples"] != done.samples:
            return Verdict(FAIL, math.inf, math.inf, f"claims {entry['samples']} samples, assigned {done.samples}")
        return judge(Sketch(entry["norm"], tuple(entry["projection"])), done.sketch, tolerance)

    def _replay(self, row, claim: dict, micro_batches: list[int], label: int) -> list[str]:
        tolerance = tolerance_for(self.config, claim["compute_dtype"])
        if self.diloco:  # one replay of the phase up to the last chosen step (step j costs j + 1 micro-batches)
            phase = self._phase(row, claim, label, max(micro_batches)) if micro_batches else []
        else:
            self._load(label)
        verdicts = []
        for index in micro_batches:
            verdict = (self._judge_step(claim, index, phase[index], tolerance) if self.diloco
                       else self.replayer.audit(claim, index, tolerance))
            self.credit.record_audit(row["report_id"], row["peer_id"], row["epoch"], index, verdict.verdict,
                                     verdict.relative_error, verdict.norm_ratio,
                                     verdict.reason + (f" (parameters of snapshot {label})" if label != row["epoch"]
                                                       else ""))
            verdicts.append(verdict.verdict)
            if self.credit.banned_reason(row["peer_id"]):
                break
        return verdicts

    def _drawable(self, row) -> int:
        return self.replayable(json.loads(row["body"])) if self.diloco else row["micro_batches"]

    def top_up(self, window: int) -> None:
        """Audit each peer's closed window until it reaches the detection confidence, drawing where the
        window is least covered (the lowest audited share of a report), from reports with a matched snapshot."""
        reports = self.credit.window_reports(window)
        for peer_id in sorted({row["peer_id"] for row in reports}):
            own = [row for row in reports if row["peer_id"] == peer_id]
            if (peer_id, window) in self._exhausted or self.credit.banned_reason(peer_id) or \
                    any(row["audit_state"] == "new" for row in own):
                continue
            verified = [row for row in own if row["audit_state"] == AUDITABLE and row["micro_batches"]]
            audited = {row["report_id"]: self.credit.audited_micro_batches(row["report_id"]) for row in verified}
            tried = {row["report_id"]: set(audited[row["report_id"]]) for row in verified}
            stuck = False
            while verified and not self.credit.confident([(row["micro_batches"], len(audited[row["report_id"]]))
                                                          for row in verified]):
                open_ = [row for row in verified if len(tried[row["report_id"]]) < self._drawable(row)
                         and self.match(row) is not None]
                if not open_ or self.credit.banned_reason(peer_id):
                    stuck = not open_
                    break  # the window stays provisional (snapshots gone, or every micro-batch tried)
                row = min(open_, key=lambda r: (len(audited[r["report_id"]]) / r["micro_batches"], r["epoch"]))
                index = self.policy.rng.choice([i for i in range(self._drawable(row))
                                                if i not in tried[row["report_id"]]])
                tried[row["report_id"]].add(index)
                verdict = self._replay(row, json.loads(row["body"]), [index], self.match(row))[0]
                if verdict in (PASS, FAIL):
                    audited[row["report_id"]].add(index)
            if stuck:
                self._exhausted.add((peer_id, window))

    def settle(self, run_epoch: int, final: bool) -> None:
        """Top up the closed windows still short of the confidence, then settle what reached it."""
        closable = run_epoch + (self.config.verification.window_epochs if final else 0)
        for window in self.credit.provisional_windows(closable):
            self.top_up(window)
        self.credit.settle(closable)


def run_auditor(run_path: Path, data_dir: Path, initial_peers: list[str], stop=None) -> None:
    """The auditor process's main loop (until SIGTERM)."""
    import os
    import threading

    from coordinator.books.connection import STORE_ENV
    from coordinator.books.ledger import LEDGER_FILE, Ledger
    from coordinator.server import KEY_FILE
    from coordinator.swarm_pass import SwarmPass
    from coordinator.swarm_snapshot import SnapshotError, SwarmObserver
    from coordinator.swarm_watch import AUDITOR_DIR, read_progress, start_watch_dht, watch_progress
    from peer.identity import load_or_create_identity
    from peer.runconfig import load_run_config
    from peer.task import load_task

    config = load_run_config(run_path)
    ledger = Ledger(os.environ.get(STORE_ENV) or Path(data_dir) / LEDGER_FILE)  # serve's --store, else its file
    credit = Credit(ledger.target, config.verification, config.run_id,
                    proof_required=config.averaging.strategy == "sync")
    # a ban evicts the peer in its own transaction (Credit.ban): the session is refused, the token and swarm
    # access withdrawn; this process's ledger then re-checks the voters
    credit.on_ban = lambda peer_id, reason: ledger.note_eviction()
    swarm_pass = SwarmPass(data_dir, AUDITOR_DIR, ledger, load_or_create_identity(data_dir, KEY_FILE),
                           config.access_token_ttl)
    stop = stop or threading.Event()
    try:
        task = load_task(config.task_name, config.task_version)
    except Exception as error:  # the coordinator may lack the task: cheap checks still run, audits do not
        log.error("auditor cannot replay work: %s", error)
        task = None
    auditor = observer = None
    if task is not None:
        observer = SwarmObserver(config, task, initial_peers, authorizer=swarm_pass.authorizer,
                                 identity_path=swarm_pass.identity_path,
                                 diloco=config.averaging.strategy == "diloco")
        dht = observer.dht
        auditor = Auditor(config, task, credit)
        # a run starts from the task's initial parameters: the auditor holds them before any download
        # (the first epochs pass before its swarm observer is ready); a report is still matched by fingerprint
        auditor.add_snapshot(0, {name: tensor.detach().clone()
                                 for name, tensor in auditor.replayer.model.state_dict().items()})
        credit.flops_per_sample = 6.0 * auditor.replayer.parameter_count
    else:
        dht = start_watch_dht(initial_peers, swarm_pass)
    watch_progress(dht, config.run_id)
    suspects: dict[str, int] = {}
    attempted: dict[int, int] = {}  # swarm epoch -> snapshot downloads tried
    print("auditor ready", flush=True)
    while not stop.is_set():
        swarm_pass.refresh()
        limit = credit.plausible_epoch()
        entries = [e for e in read_progress(dht, config.run_id) if not e.client_mode]
        liars = {e.hivemind_peer_id: e.epoch for e in entries if e.epoch > limit}
        for swarm_id, epoch in liars.items():
            peer_id = credit.peer_of_swarm_id(swarm_id)
            # an honest peer alone and fast can run ahead of its own reports (they queue in its outbox
            # while a loaded coordinator takes them in); a lie is what no backlog explains
            beyond_the_run = bool(config.epochs) and epoch > config.epochs
            if peer_id and not beyond_the_run and \
                    epoch <= credit.next_epoch_of(peer_id) + config.verification.epoch_slack + LIE_MARGIN:
                continue
            suspects[swarm_id] = suspects.get(swarm_id, 0) + 1
            if peer_id and suspects[swarm_id] >= 2 and credit.ban(
                    peer_id, f"epoch lie: published epoch {epoch} in the swarm, the run is at most at {limit}"):
                log.warning("banned %s: epoch lie (%d > %d)", peer_id, epoch, limit)
        suspects = {k: v for k, v in suspects.items() if k in liars}
        honest = [e.epoch for e in entries if e.epoch <= limit]
        if auditor is not None:
            swarm_epoch = max(honest, default=None)
            if auditor.diloco:  # DiLoCo peers publish no hivemind progress: the run's checked epoch
                swarm_epoch = credit.run_epoch()
            # every epoch's parameters are needed (a report from parameters never kept cannot be paid):
            # a failed download is tried again, a few times
            if swarm_epoch is not None and attempted.get(swarm_epoch, 0) < SNAPSHOT_TRIES and \
                    auditor.policy.snapshot_epoch(swarm_epoch):
                attempted[swarm_epoch] = attempted.get(swarm_epoch, 0) + 1
                try:
                    got = observer.download(timeout=SNAPSHOT_TIMEOUT)
                except SnapshotError as error:  # a peer served malformed state: no audit at this epoch
                    log.warning("snapshot at epoch %d refused: %s", swarm_epoch, error)
                    got = None
                if got is not None:
                    attempted[swarm_epoch] = SNAPSHOT_TRIES
                    if got.epoch not in auditor.snapshots:
                        auditor.add_snapshot(got.epoch, got.state_dict)
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
    (observer or dht).shutdown()


def main() -> None:
    """`python -m coordinator.auditor RUN DATA_DIR MADDR...`: started by `coordinator serve`."""
    import os
    import signal
    import sys
    import threading

    from coordinator.supervisor import die_with_parent, hold_exclusive_lock
    from coordinator.tensor_sharing import share_tensors_by_file_descriptor

    die_with_parent()  # a kill -9 of serve ends this process too
    share_tensors_by_file_descriptor()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s auditor %(message)s")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # one auditor per ledger, whatever happened to an earlier serve: held until this process exits
    lock = hold_exclusive_lock(Path(sys.argv[2]) / AUDITOR_LOCK, "auditor", stop)
    if lock is None:
        return
    import torch

    torch.set_num_threads(1)
    try:
        run_auditor(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:], stop)
    except Exception:
        if not stop.is_set():
            raise
        # told to stop while starting (serve stopped or died): its swarm may be gone, so the error is moot


if __name__ == "__main__":
    main()
