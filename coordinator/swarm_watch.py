"""The auditor's window on the swarm's progress records, without computing.

A client-mode DHT node (the observer's, coordinator/swarm_snapshot.py, when the task is installed)
reads what peers publish under hivemind's ``{run_id}_progress`` key: the records the swarm's epoch
is computed from (HIVEMIND_NOTES trap 4), where an epoch lie shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from peer.swarm import use_fork_start_method

AUDITOR_DIR = "auditor"  # the auditor's swarm identity and access files, inside the coordinator's data dir


@dataclass(frozen=True)
class ProgressEntry:
    hivemind_peer_id: str
    epoch: int
    samples: int
    client_mode: bool


def start_watch_dht(initial_peers: list[str], swarm_pass):
    """A client-mode DHT node for a process without an observer (the task is not installed here)."""
    import hivemind

    use_fork_start_method()
    return hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True,
                        identity_path=swarm_pass.identity_path, authorizer=swarm_pass.authorizer)


def watch_progress(dht, run_id: str):
    """Let ``dht`` read (and validate) the run's progress records, as hivemind's ProgressTracker does."""
    from hivemind.dht.schema import RSASignatureValidator, SchemaValidator
    from hivemind.optim.progress_tracker import TrainingProgressSchema

    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])


def read_progress(dht, run_id: str) -> list[ProgressEntry]:
    """Every live progress record of the run (as hivemind's ProgressTracker reads them)."""
    from hivemind.p2p import PeerID

    found = dht.get(f"{run_id}_progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    entries = []
    for item in found.value.values():
        value = getattr(item, "value", None)
        if not isinstance(value, dict):
            continue
        try:
            entries.append(ProgressEntry(PeerID(value["peer_id"]).to_base58(), int(value["epoch"]),
                                         int(value["samples_accumulated"]), bool(value["client_mode"])))
        except (KeyError, TypeError, ValueError):
            continue
    return entries
