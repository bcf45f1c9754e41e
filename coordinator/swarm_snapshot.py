"""Download the swarm's current parameters and epoch without contributing compute.

The coordinator (for checkpoints) and the auditor (for replays) need the model the peers hold
right now. hivemind.Optimizer shares its state through a DecentralizedAverager under the prefix
``f"{run_id}_state_averager"``: peers announce themselves under ``PREFIX.all_averagers`` and answer
``rpc_download_state`` with ``(metadata, tensors)``, where metadata holds the epoch and the tensors
start with the optimized parameters, in the order of the task optimizer's param groups, followed by
the optimizer's state in hivemind's flat form (``metadata["optimizer_metadata"]``); with
``with_optimizer=True`` (checkpoints) that state is checked against the task's own optimizer
(peer/optimizer_state.py) and kept.

A :class:`SwarmObserver` joins the run's DHT in client mode (it accepts no connections and is never
asked to average) and runs a bare averager with one dummy tensor that neither averages nor shares
state; it only downloads. Every download is bounded in time (hivemind's own
``load_state_from_peers`` retries forever inside the Optimizer, trap 8) and checked: metadata shape,
epoch, tensor count, shapes and dtypes against the task's ``build_model(seed)``, finite values.

Trust that remains (nothing is unpickled): hivemind decodes the metadata with msgpack (plain types
and hivemind's own ext types, no pickle) and each tensor with ``numpy.frombuffer`` under the dtype the
sender names. The state comes from whichever announced peer answers first, highest epoch first, so
one admitted peer can serve wrong (but well-formed, finite) parameters or an inflated epoch (trap 4);
the checks here catch malformed state, not a lying peer. The averager's RPCs are not guarded by the
DHT authorizer (trap 3), which is a concern for peers that share state, not for this downloader.

hivemind forks its own processes: create an observer in the main thread of a process that has no
gRPC machinery yet (see coordinator/server.py), e.g. the ``coordinator.observer`` process.

A DiLoCo run has no hivemind.Optimizer: its peers share the anchor and the outer momentum through
their DiLoCo state averager (peer/diloco.py, prefix ``f"{run_id}_diloco_state"``, tensors: anchor
then momentum, both in ``model.parameters()`` order, metadata ``{"epoch"}``). ``SwarmObserver(...,
diloco=True)`` downloads that anchor instead, with the same checks, and its momentum too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from peer.runconfig import RunConfig
from peer.swarm import use_fork_start_method

log = logging.getLogger("potluck.snapshot")

STATE_PREFIX_SUFFIX = "_state_averager"  # hivemind.Optimizer's state averager prefix is run_id + this
DILOCO_PREFIX_SUFFIX = "_diloco_state"  # a DiLoCo peer's state averager (peer/diloco.py)
DOWNLOAD_TIMEOUT = 60.0  # seconds for one whole download attempt
CHUNK_TIMEOUT = 10.0  # seconds between two parts of the stream before a peer is given up on


class SnapshotError(RuntimeError):
    """What arrived from the swarm is not a usable state for this task."""


@dataclass(frozen=True)
class SwarmSnapshot:
    epoch: int
    state_dict: dict[str, torch.Tensor]  # the model (DiLoCo: the anchor)
    optimizer: tuple[list, list] | None = None  # sync, with_optimizer: the flat optimizer state, checked
    momentum: dict[str, torch.Tensor] | None = None  # diloco: the outer momentum by parameter name, checked

    def training_state(self, strategy: str):
        """What a checkpoint of this snapshot holds (peer/checkpoint.py)."""
        from peer.checkpoint import TrainingState

        return TrainingState(model=self.state_dict, strategy=strategy, optimizer=self.optimizer,
                             momentum=dict(self.momentum or {}))


def parameter_order(task, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Names of the model's parameters in the order hivemind sends them, and a reference state dict.

    hivemind sends ``optimizer.param_groups`` flattened; building the task's optimizer locally on a
    fresh model gives exactly that order, whatever groups the task makes.
    """
    model = task.build_model(seed)
    names = {id(param): name for name, param in model.named_parameters()}
    optimizer = task.make_optimizer(model.parameters())
    order = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
    return order, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def anchor_order(task, seed: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Like :func:`parameter_order` for a DiLoCo state: the anchor is in ``model.parameters()`` order."""
    model = task.build_model(seed)
    return ([name for name, _ in model.named_parameters()],
            {name: tensor.detach().clone() for name, tensor in model.state_dict().items()})


def check_state(metadata, tensors, order: list[str], reference: dict[str, torch.Tensor], *,
                optimizer_reference=None, momentum: bool = False) -> SwarmSnapshot:
    """Turn a raw hivemind download into a checked snapshot, or raise SnapshotError.

    ``optimizer_reference``: the task's flat optimizer state (peer/optimizer_state.py); the sync
    optimizer's state that follows the parameters must match it and is kept. ``momentum``: a DiLoCo
    state, whose anchor is followed by exactly as many momentum tensors, checked the same way.
    """
    if not isinstance(metadata, dict):
        raise SnapshotError(f"state metadata is a {type(metadata).__name__}, not a dict")
    epoch = metadata.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise SnapshotError(f"state metadata has no valid epoch: {epoch!r}")
    if len(tensors) < len(order):
        raise SnapshotError(f"state has {len(tensors)} tensors, the model needs at least {len(order)}")
    state = dict(reference)  # buffers are not shared by hivemind: they stay as the task builds them
    for name, tensor in zip(order, tensors):
        expected = reference[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            got = (tuple(tensor.shape), tensor.dtype) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise SnapshotError(f"parameter {name}: got {got}, expected {(tuple(expected.shape), expected.dtype)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SnapshotError(f"parameter {name} has non-finite values")
        state[name] = tensor.detach().clone().contiguous()
    snapshot = SwarmSnapshot(epoch=epoch, state_dict=state)
    if momentum:
        return _with_momentum(snapshot, tensors[len(order):], order, reference)
    if optimizer_reference is not None:
        return _with_optimizer(snapshot, metadata, tensors[len(order):], optimizer_reference)
    return snapshot


def _with_momentum(snapshot: SwarmSnapshot, tensors, order, reference) -> SwarmSnapshot:
    if len(tensors) != len(order):
        raise SnapshotError(f"DiLoCo state has {len(tensors)} momentum tensors, the model has {len(order)} parameters")
    momentum = {}
    for name, tensor in zip(order, tensors):
        expected = reference[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise SnapshotError(f"momentum of {name}: wrong shape or dtype")
        if not torch.isfinite(tensor).all():
            raise SnapshotError(f"momentum of {name} has non-finite values")
        momentum[name] = tensor.detach().clone().contiguous()
    return SwarmSnapshot(epoch=snapshot.epoch, state_dict=snapshot.state_dict, momentum=momentum)


def _with_optimizer(snapshot: SwarmSnapshot, metadata: dict, tensors, reference) -> SwarmSnapshot:
    from peer.optimizer_state import check_flat_state

    flat_metadata = metadata.get("optimizer_metadata")
    if flat_metadata is None:
        raise SnapshotError("state has no optimizer state")
    problem = check_flat_state(flat_metadata, tensors, reference)
    if problem:
        raise SnapshotError(problem)
    optimizer = ([dict(entry) for entry in flat_metadata], [t.detach().clone().contiguous() for t in tensors])
    return SwarmSnapshot(epoch=snapshot.epoch, state_dict=snapshot.state_dict, optimizer=optimizer)


def _download_only_averager_class(diloco: bool = False):
    """A DecentralizedAverager that dials peers' TrainingStateAverager handlers (DiLoCo: StateAverager's).

    hivemind names a handler after the class that serves it (``PREFIX::TrainingStateAverager.
    rpc_download_state`` in an Optimizer), and a stub after the class that calls it; a bare
    DecentralizedAverager would ask for ``DecentralizedAverager.rpc_download_state`` and be refused.
    """
    from hivemind.averaging import DecentralizedAverager

    if diloco:
        from peer.diloco import _make_averager_class

        served_by = _make_averager_class()[1]
    else:
        from hivemind.optim.state_averager import TrainingStateAverager as served_by

    class DownloadOnlyAverager(DecentralizedAverager):
        @classmethod
        def get_stub(cls, p2p, peer, *, namespace=None):
            return served_by.get_stub(p2p, peer, namespace=namespace)

    return DownloadOnlyAverager


class SwarmObserver:
    """A read-only member of the run's swarm: DHT node in client mode plus a download-only averager."""

    def __init__(self, config: RunConfig, task, initial_peers: list[str], host: str = "127.0.0.1",
                 authorizer=None, identity_path: str | None = None, diloco: bool = False,
                 whole_state: bool = False):
        """``authorizer`` and ``identity_path``: the swarm access of this process (a SwarmPass in
        coordinator/swarm_watch.py); without them, only a swarm without access control can be joined.
        ``diloco``: download the DiLoCo anchor instead of the sync Optimizer's parameters.
        ``whole_state``: keep (checked) what a checkpoint needs beside the model: the sync optimizer's
        state, or DiLoCo's outer momentum."""
        import hivemind

        self.order, self.reference = (anchor_order if diloco else parameter_order)(task, config.seed)
        self.diloco, self.whole_state = diloco, whole_state
        self.optimizer_reference = None
        if whole_state and not diloco:
            from peer.optimizer_state import reference_state

            self.optimizer_reference = reference_state(task, config.seed)
        use_fork_start_method()
        # client mode for both (trap 2): nobody dials us, we are never part of a group
        self.dht = hivemind.DHT(
            initial_peers=initial_peers, host_maddrs=[f"/ip4/{host}/tcp/0"], client_mode=True, start=True,
            authorizer=authorizer, identity_path=identity_path,
        )
        self.averager = _download_only_averager_class(diloco)(
            averaged_tensors=[torch.zeros(1)],  # never averaged: we only download
            dht=self.dht,
            prefix=config.run_id + (DILOCO_PREFIX_SUFFIX if diloco else STATE_PREFIX_SUFFIX),
            target_group_size=1,
            client_mode=True,
            allow_state_sharing=False,
            next_chunk_timeout=CHUNK_TIMEOUT,
            start=True,
        )

    def download(self, timeout: float = DOWNLOAD_TIMEOUT) -> SwarmSnapshot | None:
        """The swarm's current state; None when no peer shared one within ``timeout`` seconds.

        Raises SnapshotError when a peer answered with state that fails the checks.
        """
        future = self.averager.load_state_from_peers(wait=False, timeout=timeout)
        try:
            loaded = future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            return None
        if loaded is None:
            return None
        metadata, tensors = loaded
        return check_state(metadata, tensors, self.order, self.reference,
                           optimizer_reference=self.optimizer_reference, momentum=self.diloco and self.whole_state)

    def shutdown(self) -> None:
        for part in (self.averager, self.dht):
            try:
                part.shutdown()
            except Exception as error:  # hivemind's shutdown is noisy (trap 10); never fail on it
                log.debug("shutdown of %s: %s", type(part).__name__, error)

    def __enter__(self) -> "SwarmObserver":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def snapshot_swarm(config: RunConfig, task, initial_peers: list[str], timeout: float = DOWNLOAD_TIMEOUT,
                   host: str = "127.0.0.1") -> tuple[int, dict[str, torch.Tensor]] | None:
    """One-shot: join, download (epoch, state_dict), leave. None when no peer shared state in time."""
    with SwarmObserver(config, task, initial_peers, host) as observer:
        snapshot = observer.download(timeout)
    return None if snapshot is None else (snapshot.epoch, snapshot.state_dict)

