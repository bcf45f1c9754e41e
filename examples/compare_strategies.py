"""Compare averaging strategies on digits at equal samples: a real coordinator and two real peers per arm.

    python -m examples.compare_strategies [--samples 10240] [--workdir DIR]

Each arm runs `coordinator serve` and two `peer join` processes (one torch thread each) on
127.0.0.1 until the swarm has trained the same number of samples, then evaluates peer a's final
model on the held-out set. Payload bytes are computed from the model size and codec (what one
peer uploads per round: (N-1)/N of the vector up as parts plus the averaged parts back); for the
sparse codec, whose size depends on the values, "B/round" is the mean measured size of the encoded
pseudo-gradient a peer sent (its round events), times (N-1)/N, up only: the averaged parts coming back
hold the union of the senders' supports (up to N times larger). The wire bytes, with hivemind's
control traffic, are measured by benchmarks/, not here.
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
    ("diloco H=16 uint8", {"strategy": "diloco", "compression": "uint8", "inner_steps": 16}),
    ("diloco H=16 sparse", {"strategy": "diloco", "compression": "sparse", "inner_steps": 16}),
    ("diloco H=16 sparse 8-bit", {"strategy": "diloco", "compression": "sparse", "inner_steps": 16, "sparse_bits": 8}),
    ("diloco H=16 sparse 2-bit", {"strategy": "diloco", "compression": "sparse", "inner_steps": 16, "sparse_bits": 2}),
]


def run_toml(settings: dict, epochs: int, seed_offset: int = 0) -> str:
    text = (ROOT / "examples" / "digits" / "run.toml").read_text().split("[averaging]")[0]
    if seed_offset:  # another model init and data assignment
        text = text.replace("seed = 20261128", f"seed = {20261128 + seed_offset}")
    text = text.replace("epochs = 20", f"epochs = {epochs}").replace("matchmaking_time = 2.0", "matchmaking_time = 1.0")
    return text + "[averaging]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def run_arm(workdir: Path, settings: dict, samples: int, seed_offset: int = 0) -> dict:
    per_round = SYNC_BATCH if settings["strategy"] == "sync" else PEERS * settings["inner_steps"] * MICRO_BATCH
    epochs = max(1, round(samples / per_round))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / "run.toml").write_text(run_toml(settings, epochs, seed_offset))
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

    model = TASK.build_model(0)  # (the architecture; the weights come from the file)
    model.load_state_dict(torch.load(workdir / "a" / "model.pt", weights_only=True)["state_dict"])
    metrics = TASK.evaluate(model, *TASK.eval_data())
    size = sum(p.numel() for p in model.parameters())
    # sync averages gradients and then parameters every epoch (two vectors); diloco one vector per round
    vectors = 2 if settings["strategy"] == "sync" else 1
    if settings["compression"] == "sparse":
        from peer.events import read_events

        sent = [e["payload_bytes"] for e in read_events(workdir / "a") if e["event"] == "round" and e["applied"]]
        upload = round(sum(sent) / max(1, len(sent))) * (PEERS - 1) // PEERS
    else:
        upload = vectors * size * BITS[settings["compression"]] // 8 * 2 * (PEERS - 1) // PEERS
    return {"rounds": epochs, "samples": epochs * per_round, "held_out_loss": metrics["loss"],
            "accuracy": metrics["accuracy"], "wall_s": wall, "payload_bytes_per_round": upload,
            "payload_bytes_per_sample": upload / (per_round / PEERS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10240)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".potluck" / "compare")
    parser.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per arm, each with another [run] seed (mean shown)")
    args = parser.parse_args()
    chosen = [arm for arm in ARMS if not args.arms or arm[0] in args.arms.split(",")]
    results = {}
    print(f"{'arm':28} {'rounds':>6} {'samples':>7} {'held-out loss':>13} {'accuracy':>8} {'B/round':>8} "
          f"{'B/sample':>8} {'wall s':>6}", flush=True)
    for index, (name, settings) in enumerate(chosen):
        runs = [run_arm(args.workdir / f"arm{index}", settings, args.samples, seed) for seed in range(args.seeds)]
        r = results[name] = {key: (sum(run[key] for run in runs) / len(runs) if key != "rounds" else runs[0][key])
                             for key in runs[0]}
        r["samples"], r["payload_bytes_per_round"] = int(r["samples"]), round(r["payload_bytes_per_round"])
        r["held_out_losses"] = [round(run["held_out_loss"], 4) for run in runs]
        print(f"{name:28} {r['rounds']:>6} {r['samples']:>7} {r['held_out_loss']:>13.4f} {r['accuracy']:>8.3f} "
              f"{r['payload_bytes_per_round']:>8} {r['payload_bytes_per_sample']:>8.1f} {r['wall_s']:>6.0f}", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
