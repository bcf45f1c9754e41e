"""The peer's hivemind side: a stable swarm identity, the DHT node and the hivemind.Optimizer.

Traps of hivemind 1.1.12 handled here (see docs/HIVEMIND_NOTES.md in the shared docs):
- DHT and Optimizer get the same client_mode (the Optimizer mis-wires its own default);
- both are created in the main thread, before any thread of ours starts (they fork processes);
- the codec of gradients and averaged state is ``[averaging] compression`` (peer.compression, which
  also fixes hivemind's 8-bit decoder for numpy >= 2.4);
- every averaging round has a timeout (all-reduce included), so a dead peer cannot hang the rest;
- both all-reduces that move the model (gradients, and parameters every epoch) aggregate each part
  with the run's robust rule (``[averaging] aggregator``, peer.averagers), and the gradient rounds
  write attestation records under the data dir (peer.attestations).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from peer import timeouts
from peer.runconfig import RunConfig

SWARM_IDENTITY_FILE = "swarm_identity.key"
LOAD_STATE_TIMEOUT = timeouts.STATE_TRY  # one try over the donors (peer/timeouts.py)
REQUEST_TIMEOUT = timeouts.REQUEST  # below matchmaking_time, as hivemind requires
PROGRESS_EXPIRATION = 15.0  # a dead peer stops counting toward the swarm after this many seconds
FIRST_FETCH_TIMEOUT = timeouts.FIRST_FETCH  # how long a new peer waits to learn the swarm's epoch before its first step


def use_fork_start_method() -> None:
    """hivemind's DHT and averagers are processes that must be forked (they cannot be pickled for
    spawn, and forkserver breaks DecentralizedAverager); newer Pythons no longer default to fork."""
    if multiprocessing.get_start_method(allow_none=True) != "fork":
        multiprocessing.set_start_method("fork", force=True)


def swarm_peer_id(data_dir: Path, file_name: str = SWARM_IDENTITY_FILE) -> str:
    """The hivemind peer id of this node, from a key file created once (so it is known before the DHT starts)."""
    from hivemind.p2p import P2P, PeerID

    path = Path(data_dir) / file_name
    if not path.exists():
        P2P.generate_identity(str(path))
        path.chmod(0o600)
    return PeerID.from_identity(path.read_bytes()).to_base58()


def start_dht(data_dir: Path, initial_peers: list[str], host: str, port: int, client_mode: bool, authorizer,
              public_ip: str | None = None, say=print):
    """This peer's DHT node; `authorizer` (peer/swarm_access.py) proves its admission to the others.
    With ``public_ip``, the node announces that address (the one other peers must dial) instead of --host.
    A failed bootstrap is retried within ``timeouts.BOOTSTRAP`` (peer/bootstrap.py), then a UserError."""
    from peer.bootstrap import start_with_retry

    what = ", ".join(initial_peers) if initial_peers else "(none)"
    return start_with_retry(lambda: _start_dht_once(data_dir, initial_peers, host, port, client_mode, authorizer,
                                                    public_ip), what, say)


def _start_dht_once(data_dir: Path, initial_peers: list[str], host: str, port: int, client_mode: bool, authorizer,
                    public_ip: str | None):
    import hivemind

    use_fork_start_method()
    return hivemind.DHT(
        initial_peers=initial_peers,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        announce_maddrs=[f"/ip4/{public_ip}/tcp/{port}"] if public_ip and not client_mode else None,
        identity_path=str(Path(data_dir) / SWARM_IDENTITY_FILE),
        client_mode=client_mode,
        authorizer=authorizer,
        wait_timeout=timeouts.DHT_RPC,
        start=True,
    )


def make_optimizer(dht, config: RunConfig, model: torch.nn.Module, task, client_mode: bool,
                   data_dir: Path | None = None):
    """The peer's hivemind.Optimizer (robust averaging); with ``data_dir``, gradient rounds are attested."""
    from peer.attestations import Attestations
    from peer.averagers import make_potluck_optimizer
    from peer.compression import make_compression

    codec = make_compression(config.averaging.compression)
    attestations = None if data_dir is None else Attestations(
        Path(data_dir), "grad", config.seed, config.verification.sketch_dims)
    return make_potluck_optimizer(
        rule=config.averaging.rule,
        attestations=attestations,
        dht=dht,
        run_id=config.run_id,
        params=model.parameters(),
        optimizer=task.make_optimizer,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=config.micro_batch_size,
        matchmaking_time=config.matchmaking_time,
        averaging_timeout=config.averaging_timeout,
        allreduce_timeout=config.averaging_timeout,
        load_state_timeout=LOAD_STATE_TIMEOUT,
        grad_compression=codec,
        state_averaging_compression=codec,
        averager_opts={"request_timeout": min(REQUEST_TIMEOUT, config.matchmaking_time / 2)},
        tracker_opts={"metadata_expiration": PROGRESS_EXPIRATION},
        # parameters are averaged too, right after each optimizer step, so a peer that missed a
        # gradient round (a late joiner, a slow one) is pulled back at once; hivemind's default
        # *delayed* state averaging applies the average at different steps on different peers and
        # makes them drift apart
        average_state_every=1,
        delay_state_averaging=False,
        client_mode=client_mode,
        verbose=False,
    )


def needs_state_from_peers(opt) -> bool:
    """Whether this peer is behind the swarm and must download state before computing more gradients.

    Uses hivemind 1.1.12's own check (a private method, pinned by our exact hivemind version), so we
    know when the next micro-batch would be thrown away and can account for it.
    """
    return opt._should_load_state_from_peers()


def load_state(opt, model: torch.nn.Module, say=lambda text: None) -> None:
    """Download the swarm's state, bounded and checked before use (peer/state_download.py); raises
    StateUnavailable (a UserError) when no donor delivered within ``timeouts.STATE_DOWNLOAD``."""
    from peer.state_download import load_state as download

    download(opt, say)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RuntimeError(f"state downloaded from peers has non-finite values in {name}")


def start_at_epoch(opt, epoch: int) -> None:
    """Make a fresh Optimizer continue a run at ``epoch`` (resuming from a checkpoint, no peer left).

    Mirrors what hivemind 1.1.12's own load_state_from_peers sets after a download: the state
    averager's epoch, the tracker's local progress, and the priority with which peers share state.
    """
    opt.state_averager.local_epoch = epoch
    with opt.tracker.pause_updates():
        opt.tracker.update_epoch(epoch)
    opt.state_averager.state_sharing_priority = epoch
