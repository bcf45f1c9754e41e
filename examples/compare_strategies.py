"""Compare averaging strategies on digits at equal samples: a real coordinator and two real peers per arm.

    python -m examples.compare_strategies [--samples 10240] [--workdir DIR]

Each arm runs `coordinator serve` and two `peer join` processes (one torch thread each) on
127.0.0.1 until the swarm has trained the same number of samples, then evaluates peer a's final
model on the held-out set. Payload bytes are computed from the model size and codec (what one
peer uploads per round: (N-1)/N of the vector up as parts plus the averaged parts back); the wire
bytes, with hivemind's control traffic, are measured by benchmarks/, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PEERS, MICRO_BATCH, SYNC_BATCH = 2, 32, 512
BITS = {"none": 32, "fp16": 16, "uint8": 8}

ARMS = [  # name, [averaging] settings
    ("sync", {"strategy": "sync", "compression": "none"}),
    ("sync fp16", {"strategy": "sync", "compression": "fp16"}),
    ("diloco H=16", {"strategy": "diloco", "compression": "none", "inner_steps": 16}),
    ("diloco H=16 keep", {"strategy": "diloco", "compression": "none", "inner_steps": 16, "inner_state": "keep"}),
    ("diloco H=16 fp16", {"strategy": "diloco", "compression": "fp16", "inner_steps": 16}),
    ("diloco H=16 uint8 overlap", {"strategy": "diloco", "compression": "uint8", "inner_steps": 16, "overlap": True}),
    ("diloco H=50 uint8", {"strategy": "diloco", "compression": "uint8", "inner_steps": 50}),
]


def run_toml(settings: dict, epochs: int) -> str:
    text = (ROOT / "examples" / "digits" / "run.toml").read_text().split("[averaging]")[0]
    text = text.replace("epochs = 20", f"epochs = {epochs}").replace("matchmaking_time = 2.0", "matchmaking_time = 1.0")
    return text + "[averaging]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def run_arm(workdir: Path, settings: dict, samples: int) -> dict:
    per_round = SYNC_BATCH if settings["strategy"] == "sync" else PEERS * settings["inner_steps"] * MICRO_BATCH
    epochs = max(1, round(samples / per_round))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / "run.toml").write_text(run_toml(settings, epochs))
    started = time.monotonic()
    procs = [subprocess.Popen([str(BIN / "coordinator"), "serve", "--run", str(workdir / "run.toml"), "--data-dir",
                               str(workdir / "c"), "--port", "0"], stdout=open(workdir / "c.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        info_path = workdir / "c" / "coordinator.json"
        while not info_path.exists():
            time.sleep(0.2)
        time.sleep(0.5)
        info = json.loads(info_path.read_text())
        token = (workdir / "c" / "default-org.token").read_text().strip()
        pin = ["--fingerprint", info["tls_fingerprint"]] if info.get("tls_fingerprint") else ["--insecure"]
        peers = [subprocess.Popen([str(BIN / "peer"), "join", info["address"], "--token", token, *pin, "--data-dir",
                                   str(workdir / name), "--threads", "1", "--progress", "plain"],
                                  stdout=open(workdir / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True) for name in ("a", "b")]
        procs += peers
        for peer in peers:
            peer.wait(timeout=900)
        wall = time.monotonic() - started
    finally:  # each process leads its own session: end the group, so serve's auditor and p2pd go too
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    from examples.digits import TASK

    model = TASK.build_model(0)
    model.load_state_dict(torch.load(workdir / "a" / "model.pt", weights_only=True)["state_dict"])
    metrics = TASK.evaluate(model, *TASK.eval_data())
    size = sum(p.numel() for p in model.parameters())
    # sync averages gradients and then parameters every epoch (two vectors); diloco one vector per round
    vectors = 2 if settings["strategy"] == "sync" else 1
    upload = vectors * size * BITS[settings["compression"]] // 8 * 2 * (PEERS - 1) // PEERS
    return {"rounds": epochs, "samples": epochs * per_round, "held_out_loss": metrics["loss"],
            "accuracy": metrics["accuracy"], "wall_s": wall, "payload_bytes_per_round": upload,
            "payload_bytes_per_sample": upload / (per_round / PEERS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10240)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".potluck" / "compare")
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    args = parser.parse_args()
    chosen = [arm for arm in ARMS if not args.arms or arm[0] in args.arms.split(",")]
    results = {}
    print(f"{'arm':28} {'rounds':>6} {'samples':>7} {'held-out loss':>13} {'accuracy':>8} {'B/round':>8} "
          f"{'B/sample':>8} {'wall s':>6}", flush=True)
    for index, (name, settings) in enumerate(chosen):
        r = results[name] = run_arm(args.workdir / f"arm{index}", settings, args.samples)
        print(f"{name:28} {r['rounds']:>6} {r['samples']:>7} {r['held_out_loss']:>13.4f} {r['accuracy']:>8.3f} "
              f"{r['payload_bytes_per_round']:>8} {r['payload_bytes_per_sample']:>8.1f} {r['wall_s']:>6.0f}", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
