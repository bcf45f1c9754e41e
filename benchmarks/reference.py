"""The single-process references: one process doing all the samples (figures c, d) and a bare torch
loop (figure f), on the same task, model, micro-batches and optimizer as the peers.

Real compute only; with simulated compute the harness adds the fixed sleep per step analytically
(a single process would sleep it too), which keeps this fast on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks.simtask import BenchTask
from peer.assignment import micro_batch_indices

REFERENCE_PEER = "reference"


@dataclass
class Curve:
    """Held-out loss of the single process after `samples` samples; step_seconds is its real time per step."""

    samples: list[int]
    loss: list[float]
    step_seconds: float

    def loss_at(self, samples: float) -> float | None:
        """Held-out loss after `samples` samples (linear between evaluations); None past the curve."""
        if not self.samples or samples > self.samples[-1]:
            return None
        for (s0, l0), (s1, l1) in zip(zip(self.samples, self.loss), zip(self.samples[1:], self.loss[1:])):
            if s0 <= samples <= s1:
                return l0 + (l1 - l0) * (samples - s0) / max(s1 - s0, 1)
        return self.loss[0]

    def samples_to(self, target: float) -> float | None:
        """Samples until the held-out loss first reaches target (linear between evaluations)."""
        for (s0, l0), (s1, l1) in zip(zip(self.samples, self.loss), zip(self.samples[1:], self.loss[1:])):
            if l1 <= target:
                return s0 + (s1 - s0) * (l0 - target) / max(l0 - l1, 1e-12) if l0 > target else s0
        return None


def single_process_curve(hidden: int, seed: int, micro_batch: int, total_samples: int, evaluations: int = 40) -> Curve:
    """Train one process on total_samples samples, one optimizer step per micro-batch."""
    torch.set_num_threads(1)
    task = BenchTask(hidden=hidden, sleep_seconds=0)
    model, (inputs, targets), (eval_inputs, eval_targets) = task.build_model(seed), task.train_data(), task.eval_data()
    optimizer = task.make_optimizer(model.parameters())
    steps = max(total_samples // micro_batch, 1)
    every = max(steps // evaluations, 1)
    samples, losses = [0], [task.evaluate(model.eval(), eval_inputs, eval_targets)["loss"]]
    model.train()
    compute = 0.0
    for step in range(steps):
        started = time.perf_counter()
        index = micro_batch_indices(seed, 0, REFERENCE_PEER, step, len(inputs), micro_batch)
        loss = task.loss(model, inputs[index], targets[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        compute += time.perf_counter() - started
        if (step + 1) % every == 0 or step == steps - 1:
            samples.append((step + 1) * micro_batch)
            losses.append(task.evaluate(model.eval(), eval_inputs, eval_targets)["loss"])
            model.train()
    return Curve(samples, losses, compute / steps)


def bare_loop_samples_per_second(hidden: int, seed: int, micro_batch: int, seconds: float) -> float:
    """samples/s of a plain torch loop (forward, backward, optimizer step) for `seconds`."""
    torch.set_num_threads(1)
    task = BenchTask(hidden=hidden, sleep_seconds=0)
    model, (inputs, targets) = task.build_model(seed), task.train_data()
    optimizer = task.make_optimizer(model.parameters())
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        index = micro_batch_indices(seed, 0, REFERENCE_PEER, step, len(inputs), micro_batch)
        loss = task.loss(model, inputs[index], targets[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
    return step * micro_batch / (time.perf_counter() - started)


def parallel_bare_loops(processes: int, hidden: int, seed: int, micro_batch: int, seconds: float) -> float:
    """Mean samples/s of `processes` bare loops running at once (as many as the peers they are compared
    with, so both face the same CPU contention), each in its own process with one thread."""
    args = [sys.executable, "-m", "benchmarks.reference", str(hidden), str(seed), str(micro_batch), str(seconds)]
    from benchmarks.procs import ROOT, child_env

    # one OpenMP thread, as the peers have (spinning OpenMP workers on a busy 2-core box halve the rate)
    loops = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=child_env({"OMP_NUM_THREADS": "1"}),
                              cwd=ROOT)
             for _ in range(processes)]
    rates = []
    for loop in loops:
        out, _ = loop.communicate(timeout=seconds + 120)
        rates.append(float(out.strip()))
    return sum(rates) / len(rates)


if __name__ == "__main__":
    hidden_, seed_, micro_batch_, seconds_ = sys.argv[1:5]
    print(bare_loop_samples_per_second(int(hidden_), int(seed_), int(micro_batch_), float(seconds_)))
