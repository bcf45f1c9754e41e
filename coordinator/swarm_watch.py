"""The auditor's window on the swarm: progress records and parameter downloads, without computing.

A client-mode DHT node reads what peers publish under hivemind's ``{run_id}_progress`` key (the
records the swarm's epoch is computed from, HIVEMIND_NOTES trap 4), and a client-mode averager
downloads the swarm's state the way a late joiner does. Downloads carry no pickles: hivemind sends
msgpack metadata and raw tensors, and shapes plus finiteness are checked here.
(To be replaced by the dashboard's coordinator/swarm_snapshot.py once it lands, which does the same.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.swarm import use_fork_start_method

DOWNLOAD_TIMEOUT = 30.0
AUDITOR_DIR = "auditor"  # the auditor's swarm identity and access files, inside the coordinator's data dir
IDENTITY_FILE = "swarm_identity.key"


@dataclass(frozen=True)
class ProgressEntry:
    hivemind_peer_id: str
    epoch: int
    samples: int
    client_mode: bool


class SwarmPass:
    """The auditor's admission to the swarm: its own swarm identity, listed among the coordinator's
    internal ids (so peers serve it state), and an access token the coordinator's key signs."""

    def __init__(self, data_dir: Path, ledger, coordinator_identity, ttl: float):
        from peer.swarm import swarm_peer_id
        from peer.swarm_access import AccessFiles, make_authorizer

        self.dir = Path(data_dir) / AUDITOR_DIR
        self.dir.mkdir(exist_ok=True)
        self.ledger, self.identity, self.ttl = ledger, coordinator_identity, ttl
        self.files = AccessFiles(self.dir)
        self.authorizer = make_authorizer(self.dir, coordinator_identity.public_bytes)
        self.peer_id = swarm_peer_id(self.dir, IDENTITY_FILE)
        internal = json.loads(ledger.meta("internal_swarm_ids") or "[]")
        ledger.set_internal_swarm_ids(sorted(set(internal) | {self.peer_id}))
        self._renewed = 0.0
        self.refresh()

    def refresh(self) -> None:
        from peer.swarm_access import issue_access_token, rsa_public_key

        if time.time() - self._renewed > self.ttl / 2:
            token = issue_access_token(self.identity.private_key, self.peer_id, rsa_public_key(self.authorizer),
                                       self.ttl)
            self.files.write_token(token.SerializeToString())
            self._renewed = time.time()
        version, allow, deny = self.ledger.swarm_lists()
        if version != self.files.version():
            self.files.write_lists(version, allow, deny)


def start_watch_dht(initial_peers: list[str], run_id: str, swarm_pass: SwarmPass):
    import hivemind
    from hivemind.dht.schema import RSASignatureValidator, SchemaValidator
    from hivemind.optim.progress_tracker import TrainingProgressSchema

    use_fork_start_method()
    dht = hivemind.DHT(initial_peers=initial_peers, client_mode=True, start=True,
                       identity_path=str(swarm_pass.dir / IDENTITY_FILE), authorizer=swarm_pass.authorizer)
    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])
    return dht


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


def _state_averager_client():
    """A bare averager whose RPC names match the peers' TrainingStateAverager (hivemind names a
    handler after the servicer's class), so it can call their rpc_download_state."""
    from hivemind.averaging import DecentralizedAverager

    return type("TrainingStateAverager", (DecentralizedAverager,), {})


class StateDownloader:
    """Downloads the swarm's current parameters (and the epoch they belong to) from one peer."""

    def __init__(self, dht, run_id: str, template: list[torch.Tensor]):
        self.template = template
        self._averager = _state_averager_client()(
            [torch.zeros(1)], dht, start=True, prefix=f"{run_id}_state_averager", client_mode=True,
            min_matchmaking_time=2.0, request_timeout=1.0,
        )

    def download(self, timeout: float = DOWNLOAD_TIMEOUT) -> tuple[int, list[torch.Tensor]] | None:
        loaded = self._averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return None
        metadata, tensors = loaded
        if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
            return None
        parameters = list(tensors[: len(self.template)])
        if len(parameters) != len(self.template) or any(
                p.shape != q.shape or not torch.isfinite(p).all() for p, q in zip(parameters, self.template)):
            return None
        return metadata["epoch"], [p.float().clone() for p in parameters]

    def shutdown(self) -> None:
        self._averager.shutdown()
