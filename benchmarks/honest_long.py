"""``python -m benchmarks honest-long [--epochs 200] --out F.json``: count false positives in a long,
all-honest run with churn.

Three honest peers (two of the default org, one of a partner org) train digits through the real CLIs
for ``--epochs`` epochs. A third of the way in, the partner org is removed (its peer is evicted and
exits 3); half way, one default-org peer leaves (SIGTERM) and rejoins from the same data dir. At the
end it records, per peer, the auditor's verdicts (pass / inconclusive / fail), binding checks, strikes,
bans, settled and provisional samples, and each window's detection confidence, plus `coordinator
ledger verify`. Every honest peer must end with zero fails, zero strikes and no ban: an honest
volunteer punished is as bad as a cheater paid. This is the long run of issue 10, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procs import ROOT, Processes, child_env

DIGITS_RUN = ROOT / "examples" / "digits" / "run.toml"
BIN = Path(sys.executable).parent


def write_run(path: Path, epochs: int, target_batch_size: int) -> Path:
    lines = []
    for line in DIGITS_RUN.read_text().splitlines():
        key = line.split("=")[0].strip()
        if key == "epochs":
            line = f"epochs = {epochs}"
        elif key == "target_batch_size":
            line = f"target_batch_size = {target_batch_size}"
        elif key == "every":
            line = "every = 0"  # checkpoints are another test's business
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=child_env(),
                          timeout=120)


def wait_for(predicate, timeout: float, what: str, processes: Processes):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        processes.sleep(1.0)


def epochs_done(data_dir: Path) -> int:
    path = data_dir / "events.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"event": "epoch"' in line)


def verdicts(ledger: Path) -> dict:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        counts: dict = {}
        for peer_id, verdict, n in db.execute("SELECT peer_id, verdict, COUNT(*) FROM audits GROUP BY 1, 2"):
            counts.setdefault(peer_id, {})[verdict] = n
        binding = {}
        try:
            for subject, verdict, n in db.execute("SELECT subject, verdict, COUNT(*) FROM binding_checks GROUP BY 1, 2"):
                binding.setdefault(subject, {})[verdict] = n
        except sqlite3.OperationalError:
            pass
        return {"audits": counts, "binding": binding}
    finally:
        db.close()


def run(epochs: int, workdir: Path, target_batch_size: int, log=print) -> dict:
    processes = Processes(workdir / "logs")
    started = time.monotonic()
    try:
        run_file = write_run(workdir / "run.toml", epochs, target_batch_size)
        cdir = workdir / "c"
        cdir.mkdir(parents=True, exist_ok=True)
        coordinator = processes.start([str(BIN / "coordinator"), "serve", "--run", str(run_file), "--data-dir",
                                       str(cdir), "--port", "0", "--no-dashboard"], "coordinator")
        info = wait_for(lambda: _info(cdir, coordinator.pid), 60, "coordinator.json", processes)
        address, fingerprint = info["address"], info["tls_fingerprint"]
        default_token = (cdir / "default-org.token").read_text().strip()
        assert cli("coordinator", "org", "add", "Partner", "--data-dir", str(cdir)).returncode == 0
        issued = cli("coordinator", "token", "issue", "--org", "Partner", "--max-peers", "2", "--format", "json",
                     "--data-dir", str(cdir))
        partner_token = json.loads(issued.stdout)["token"]

        def join(name: str, token: str):
            data_dir = workdir / name
            data_dir.mkdir(exist_ok=True)
            return processes.start([str(BIN / "peer"), "join", address, "--token", token, "--fingerprint",
                                    fingerprint, "--data-dir", str(data_dir), "--threads", "1", "--progress",
                                    "plain"], name)

        peers = {"a": join("a", default_token), "b": join("b", default_token), "p": join("p", partner_token)}
        wait_for(lambda: epochs_done(workdir / "a") >= epochs // 3, 40 * epochs, "a third of the run", processes)
        removed = cli("coordinator", "org", "remove", "Partner", "--data-dir", str(cdir))
        log(f"epoch ~{epochs // 3}: org Partner removed ({removed.returncode})")
        partner_exit = peers["p"].wait(120)
        wait_for(lambda: epochs_done(workdir / "a") >= epochs // 2, 40 * epochs, "half the run", processes)
        processes.signal_group(peers["b"], signal.SIGTERM)
        try:
            b_exit = peers["b"].wait(90)
        except subprocess.TimeoutExpired:  # a graceful leave that hangs in hivemind's shutdown: noted
            log("peer b did not leave within 90 s of SIGTERM; a second SIGTERM ends it")
            processes.signal_group(peers["b"], signal.SIGTERM)
            b_exit = f"hung, then {peers['b'].wait(60)}"
        log(f"epoch ~{epochs // 2}: peer b left ({b_exit}); rejoining")
        processes.sleep(12)  # a peer killed without a Leave may rejoin once peer_timeout (10 s) has passed
        peers["b"] = join("b", default_token)
        a_exit = peers["a"].wait(60 * epochs)
        try:
            b2_exit = peers["b"].wait(300)
        except subprocess.TimeoutExpired:  # noted, then ended: the figures below are still read
            log("the rejoined peer b did not finish within 300 s of the run's end")
            processes.signal_group(peers["b"], signal.SIGKILL)
            b2_exit = "did not finish"
        processes.sleep(15)  # the auditor settles what the last reports opened
        ledger = json.loads(cli("coordinator", "ledger", "--data-dir", str(cdir), "--format", "json").stdout)
        verified = cli("coordinator", "ledger", "verify", "--data-dir", str(cdir))
        ids = {name: cli("peer", "id", "--data-dir", str(workdir / name)).stdout.strip() for name in ("a", "b", "p")}
        counted = verdicts(cdir / "ledger.sqlite")
        rows = {row["peer"]: row for row in ledger}
        peers_out = {}
        for name, peer_id in ids.items():
            row = rows.get(peer_id, {})
            peers_out[name] = {
                "peer_id": peer_id, "epochs": epochs_done(workdir / name),
                "audits": counted["audits"].get(peer_id, {}), "binding": counted["binding"].get(peer_id, {}),
                "strikes": row.get("strikes"), "banned": row.get("banned"),
                "samples_settled": row.get("samples_settled"), "samples_provisional": row.get("samples_provisional"),
                "samples_unverified": row.get("samples_unverified"),
                "windows": [{k: w.get(k) for k in ("window", "state", "confidence")} for w in row.get("windows", [])],
            }
        honest_fails = sum(p["audits"].get("fail", 0) + p["binding"].get("fail", 0) for p in peers_out.values())
        honest_audits = sum(sum(p["audits"].values()) for p in peers_out.values())
        return {
            "epochs": epochs, "target_batch_size": target_batch_size, "seconds": round(time.monotonic() - started),
            "exits": {"a": a_exit, "b_left": b_exit, "b_rejoined": b2_exit, "partner_evicted": partner_exit},
            "ledger_verify": verified.returncode, "peers": peers_out,
            "honest_audits": honest_audits, "false_positives": honest_fails,
            "struck_or_banned": [n for n, p in peers_out.items() if p["strikes"] or p["banned"]],
        }
    finally:
        processes.close()


def _info(cdir: Path, pid: int):
    try:
        info = json.loads((cdir / "coordinator.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info if info.get("pid") == pid else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks honest-long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--target-batch-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, required=True, help="an empty folder for data dirs and logs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = run(args.epochs, args.workdir, args.target_batch_size, log=lambda line: print(line, file=sys.stderr))
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "peers"}, indent=1))
    return 0 if result["false_positives"] == 0 and not result["struck_or_banned"] else 1


if __name__ == "__main__":
    sys.exit(main())
