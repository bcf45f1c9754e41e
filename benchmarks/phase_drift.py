"""How far a bf16 DiLoCo phase drifts from the auditor's fp32 replay, step by step.

    python benchmarks/phase_drift.py TASK MICRO_BATCH STEPS     e.g. examples.digits 32 50

A GPU peer computes under bf16 autocast; the auditor replays on the CPU in fp32
(coordinator/phase_replay.py). Step j's gradient is taken where steps 0..j-1 led, so the two
trajectories drift apart; this prints max(relative L2 error, |norm ratio - 1|) of the step-j
sketches, with CPU bf16 autocast standing in for the GPU's. It decides how many steps of a bf16
report may be judged against the bf16 tolerance.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.task import load_task
from peer.work import do_micro_batch
from peer.sketch import relative_error, norm_ratio
torch.set_num_threads(1)
name, mbs, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
task = load_task(name, "1"); inputs, targets = task.train_data()
def trajectory(autocast):
    model = task.build_model(1); opt = task.make_optimizer(model.parameters()); out = []
    for j in range(steps):
        out.append(do_micro_batch(task, model, inputs, targets, run_seed=1, epoch=0, peer_id="p", micro_batch=j,
                                  micro_batch_size=mbs, sketch_dims=64, device=torch.device("cpu"), autocast=autocast).sketch)
        opt.step()
    return out
bf16 = trajectory(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
fp32 = trajectory(None)
off = [max(relative_error(a, b), abs(norm_ratio(a, b) - 1)) for a, b in zip(bf16, fp32)]
print(name, "steps", steps, "off at j=0,1,2,5,10,20,...:", [(j, round(off[j], 3)) for j in (0, 1, 2, 5, 10, 20, 30, 49) if j < steps],
      "max", round(max(off), 3))
