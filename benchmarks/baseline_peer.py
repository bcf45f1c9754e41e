"""The baseline arm: plain ``hivemind.Optimizer`` with its defaults, training the same task on the
same micro-batches as a potluck peer, and writing the same ``events.jsonl`` (plus compute seconds),
so both arms are measured by the same code.

``python -m benchmarks.baseline_peer bootstrap --host H --out FILE --seconds S``: a DHT node whose
multiaddrs go to FILE (the baseline's stand-in for potluck's coordinator).
``python -m benchmarks.baseline_peer train --host H --maddrs FILE --data-dir D --index I ...``: one peer.
Both stop by themselves after --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

LOAD_STATE_TIMEOUT = 120.0  # bounded (hivemind's default is 600 s, trap 8)


def bootstrap(args) -> None:
    import hivemind

    from peer.swarm import use_fork_start_method

    use_fork_start_method()
    dht = hivemind.DHT(host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True)
    Path(args.out).write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
    time.sleep(args.seconds)
    dht.shutdown()


def wait_for_file_count(folder: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("ready-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def train(args) -> None:
    import hivemind
    import torch

    from benchmarks.simtask import TASK
    from peer.assignment import micro_batch_indices
    from peer.events import EventLog
    from peer.swarm import use_fork_start_method

    torch.set_num_threads(1)
    use_fork_start_method()
    deadline = time.monotonic() + args.seconds
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(data_dir)
    peer_id = f"baseline-{args.index}"
    events.emit("joined", peer_id=peer_id)
    dht = hivemind.DHT(initial_peers=json.loads(Path(args.maddrs).read_text()),
                       host_maddrs=[f"/ip4/{args.host}/tcp/0"], client_mode=False, start=True)
    model = TASK.build_model(args.seed)
    opt = hivemind.Optimizer(dht=dht, run_id=args.run_id, params=model.parameters(), optimizer=TASK.make_optimizer,
                             target_batch_size=args.target_batch, batch_size_per_step=args.micro_batch,
                             load_state_timeout=LOAD_STATE_TIMEOUT, client_mode=False, verbose=False)
    inputs, targets = TASK.train_data()
    eval_inputs, eval_targets = TASK.eval_data()
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.index}").touch()
    wait_for_file_count(barrier, args.peers, timeout=max(deadline - time.monotonic(), 0))
    events.emit("started", epoch=opt.local_epoch)
    opt.tracker.fetched_global_progress_this_epoch.wait(15)
    if opt._should_load_state_from_peers():
        opt.load_state_from_peers()
        events.emit("state_loaded", epoch=opt.local_epoch)
    epoch, micro_batch, samples, compute, loss_sum = opt.local_epoch, 0, 0, 0.0, 0.0
    while time.monotonic() < deadline and (not args.epochs or opt.local_epoch < args.epochs):
        started = time.perf_counter()
        index = micro_batch_indices(args.seed, epoch, peer_id, micro_batch, len(inputs), args.micro_batch)
        loss = TASK.loss(model, inputs[index], targets[index])
        loss.backward()
        compute += time.perf_counter() - started
        opt.step()
        opt.zero_grad()
        samples, loss_sum, micro_batch = samples + len(index), loss_sum + loss.item() * len(index), micro_batch + 1
        if opt.local_epoch != epoch:
            model.eval()
            metrics = TASK.evaluate(model, eval_inputs, eval_targets)
            model.train()
            events.emit("epoch", epoch=epoch, samples=samples, loss=loss_sum / samples, metrics=metrics,
                        compute_seconds=compute)
            epoch, micro_batch, samples, compute, loss_sum = opt.local_epoch, 0, 0, 0.0, 0.0
    events.emit("finished", epoch=opt.local_epoch)
    events.close()
    os._exit(0)  # hivemind's shutdown can hang (trap 10); the harness kills the group anyway


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_peer")
    parser.add_argument("role", choices=["bootstrap", "train"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out")
    parser.add_argument("--maddrs")
    parser.add_argument("--data-dir")
    parser.add_argument("--barrier")
    parser.add_argument("--index", default="0")
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--run-id", default="bench-baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-batch", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=0)
    args = parser.parse_args()
    (bootstrap if args.role == "bootstrap" else train)(args)


if __name__ == "__main__":
    main()
