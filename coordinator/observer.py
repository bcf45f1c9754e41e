"""`python -m coordinator.observer`: the coordinator's read-only swarm member, which writes checkpoints.

`coordinator serve` starts it as a child process: hivemind forks processes of its own, and the
serve process runs gRPC threads, which must not be forked (see coordinator/server.py). The observer
watches the run's epoch in the ledger; every ``[checkpoints] every`` epochs it downloads the swarm's
training state (coordinator/swarm_snapshot.py: sync, the averaged parameters and the optimizer's
state; DiLoCo, the anchor and the outer momentum) and saves it (coordinator/checkpoints.py). A
checkpoint that cannot be taken is one ``checkpoint failed at epoch N: why`` line on the operator's
console (hivemind's own logs stay quiet unless -v), and is retried.
It joins the swarm only when the first checkpoint is due, so short runs never pay for it, and it
exits when its parent does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from coordinator.checkpoints import clear_failure, latest_checkpoint, record_failure, save_checkpoint
from coordinator.books.connection import STORE_ENV
from coordinator.books.ledger import Ledger
from coordinator.swarm_pass import SwarmPass
from coordinator.swarm_snapshot import SnapshotError, SwarmObserver
from peer.identity import load_or_create_identity
from peer.runconfig import load_run_config
from peer.task import load_task

log = logging.getLogger("potluck.observer")

OBSERVER_DIR = "observer"  # the observer's swarm identity and access files, inside the data dir
POLL_SECONDS = 1.0  # how often the ledger's epoch is read
RETRY_SECONDS = 5.0  # wait after a download that brought nothing new
DOWNLOAD_TIMEOUT = 30.0


def next_due(last_saved: int, every: int) -> int:
    """The epoch of the next checkpoint: the next multiple of ``every`` after the last one saved, so a
    late checkpoint (the swarm's state arrived at epoch 51) does not shift every later one."""
    return (last_saved // every + 1) * every


def run_observer(run_path: Path, data_dir: Path, initial_peers: list[str], host: str) -> None:
    config = load_run_config(run_path)
    if config.checkpoint_every <= 0:
        return
    task = load_task(config.task_name, config.task_version)
    ledger = Ledger.open_existing(data_dir, os.environ.get(STORE_ENV))  # serve's --store, else its file
    from coordinator.server import KEY_FILE  # the coordinator's key signs this process's swarm access

    swarm_pass = SwarmPass(data_dir, OBSERVER_DIR, ledger, load_or_create_identity(data_dir, KEY_FILE),
                           config.access_token_ttl)
    parent = os.getppid()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    strategy = config.averaging.strategy
    latest = latest_checkpoint(data_dir)
    last_saved = latest.epoch if latest is not None and latest.run_id == config.run_id else 0
    observer: SwarmObserver | None = None
    failures = FailureLine(lambda epoch, why: record_failure(data_dir, epoch, why))
    try:
        while not stop.is_set() and os.getppid() == parent:
            swarm_pass.refresh()
            epoch = ledger.snapshot(config.peer_timeout)["epoch"]
            due = next_due(last_saved, config.checkpoint_every)
            if epoch < due:
                stop.wait(POLL_SECONDS)
                continue
            try:
                if observer is None:
                    observer = SwarmObserver(config, task, initial_peers, host, authorizer=swarm_pass.authorizer,
                                             identity_path=swarm_pass.identity_path, diloco=strategy == "diloco",
                                             whole_state=True)
                snapshot = observer.download(DOWNLOAD_TIMEOUT)
                if snapshot is None:
                    failures.say(epoch, "no peer shared its state (every peer may have left, or none accepts "
                                        "connections); retrying")
                elif snapshot.epoch >= due:
                    manifest = save_checkpoint(data_dir, snapshot.epoch, snapshot.training_state(strategy),
                                               config.run_id, config.config_hash, config.checkpoint_keep)
                    last_saved = manifest.epoch
                    failures.clear()
                    clear_failure(data_dir)
                    print(f"checkpoint: epoch {manifest.epoch} saved ({manifest.holds}, {manifest.bytes:,} bytes, "
                          f"sha256 {manifest.sha256[:16]}…)", flush=True)
                    continue
            except SnapshotError as error:
                failures.say(epoch, f"a peer sent unusable state ({error}); retrying")
            except Exception as error:  # hivemind or the disk: one line, the observer goes on
                log.debug("checkpoint attempt failed", exc_info=True)
                failures.say(epoch, f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
            stop.wait(RETRY_SECONDS)
    finally:
        if observer is not None:
            observer.shutdown()
        ledger.close()


class FailureLine:
    """``checkpoint failed at epoch N: why`` on the operator's console, once per epoch and reason;
    ``record`` keeps it for the dashboard's alert too."""

    def __init__(self, record=lambda epoch, why: None):
        self.last: tuple[int, str] | None = None
        self.record = record

    def say(self, epoch: int, why: str) -> None:
        if self.last != (epoch, why):
            print(f"checkpoint failed at epoch {epoch}: {why}", flush=True)
            self.last = (epoch, why)
            try:
                self.record(epoch, why)
            except OSError as error:  # a full disk must not end the observer: the line above is said
                log.debug("could not record the failure: %s", error)

    def clear(self) -> None:
        self.last = None


def main(argv: list[str] | None = None) -> None:
    from coordinator.supervisor import die_with_parent
    from coordinator.tensor_sharing import share_tensors_by_file_descriptor

    die_with_parent()  # a kill -9 of serve ends this process too
    share_tensors_by_file_descriptor()
    parser = argparse.ArgumentParser(prog="python -m coordinator.observer", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--initial-peer", action="append", default=[], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    if not args.verbose:  # a failed download is one "checkpoint failed" line, not hivemind's traceback
        os.environ["HIVEMIND_LOGLEVEL"] = "CRITICAL"
        logging.getLogger("hivemind").setLevel(logging.CRITICAL)
    run_observer(args.run, args.data_dir, args.initial_peer, args.host)


if __name__ == "__main__":
    main()
