"""The Quickstart demo: a local coordinator plus two peers of two organizations training digits.

Everything is a real OS process talking over 127.0.0.1, exactly as an operator and two volunteers
would run it; this script only starts them, shows the ledger live, and prints a summary.
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

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.books.ledger import Ledger
from coordinator.run_view import with_accounts
from coordinator.status import status_renderable
from peer.events import read_events

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORGS = ("default", "acme-lab")
STARTUP_TIMEOUT = 60.0
RUN_TIMEOUT = 900.0


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A child in its own process group, so it can be stopped with its hivemind helpers."""
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftover hivemind helpers of that group
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_coordinator(process: subprocess.Popen, data_dir: Path, log: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: the coordinator exited early; its log:\n{log.read_text()}")
        try:
            info = json.loads((data_dir / "coordinator.json").read_text())
            if info["pid"] == process.pid:
                return info
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    sys.exit(f"error: the coordinator did not start within {STARTUP_TIMEOUT:.0f}s; see {log}")


def issue_token(data_dir: Path, org: str) -> str:
    """Add a partner org and give it a single-use token, as an operator would."""
    coordinator = str(BIN / "coordinator")
    subprocess.run([coordinator, "org", "add", org, "--data-dir", str(data_dir)], capture_output=True, check=True)
    result = subprocess.run([coordinator, "token", "issue", "--org", org, "--data-dir", str(data_dir),
                             "--format", "json"], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["token"]


def summary(state: dict, peer_dirs: list[Path], wall: float) -> Table:
    finished = [e for d in peer_dirs for e in read_events(d) if e["event"] == "finished"]
    accuracy = max((e["metrics"].get("accuracy", 0.0) for e in finished), default=None)
    table = Table(title="potluck demo: summary", show_header=False)
    table.add_row("run", f"{state['run_id']}, {state['epoch']} global epochs, {state['samples']:,} samples")
    table.add_row("final training loss", "-" if state["loss"] is None else f"{state['loss']:.4f}")
    table.add_row("held-out accuracy", "-" if accuracy is None else f"{accuracy:.3f} (chance: 0.100)")
    for peer in state["peers"]:
        table.add_row(f"peer {peer['id']} ({peer['org']})", f"{peer['samples']:,} samples in {peer['reports']} reports")
    for org in state["orgs"]:
        table.add_row(f"org {org['name']}", f"{org['samples']:,} samples from {org['peers']} peer(s)")
    table.add_row("wall time", f"{wall:.1f} s")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "examples" / "digits" / "run.toml")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".potluck" / "demo",
                        help="emptied and reused: coordinator and peer data dirs plus logs")
    args = parser.parse_args()
    began = time.monotonic()
    console = Console()
    shutil.rmtree(args.workdir, ignore_errors=True)
    coordinator_dir = args.workdir / "coordinator"
    coordinator_dir.mkdir(parents=True)
    processes: list[subprocess.Popen] = []
    try:
        log = args.workdir / "coordinator.log"
        coordinator = start([str(BIN / "coordinator"), "serve", "--run", str(args.run), "--data-dir",
                             str(coordinator_dir), "--port", "0", "--dashboard-port", "0"], log)
        processes.append(coordinator)
        info = wait_for_coordinator(coordinator, coordinator_dir, log)
        console.print(f"coordinator up at {info['address']} (log: {log.relative_to(ROOT) if log.is_relative_to(ROOT) else log})")
        if info.get("dashboard"):
            console.print(f"dashboard: {info['dashboard']} (open it in a browser while the demo runs)")
        tokens = [(coordinator_dir / "default-org.token").read_text().strip()] + [
            issue_token(coordinator_dir, org) for org in ORGS[1:]
        ]
        peer_dirs = [args.workdir / f"peer-{i + 1}" for i in range(len(ORGS))]
        peers = []
        for org, token, peer_dir in zip(ORGS, tokens, peer_dirs):
            command = [str(BIN / "peer"), "join", info["address"], "--token", token, "--fingerprint",
                       info["tls_fingerprint"], "--data-dir", str(peer_dir), "--threads", "1", "--progress", "quiet"]
            console.print(f"peer of org [bold]{org}[/]: peer join {info['address']} --token {token[:16]}… "
                          f"--fingerprint {info['tls_fingerprint'][:16]}…")
            peers.append(start(command, args.workdir / f"{peer_dir.name}.log"))
        processes.extend(peers)

        ledger = Ledger.open_existing(coordinator_dir)
        with Live(console=console, refresh_per_second=4) as live:
            deadline = time.monotonic() + RUN_TIMEOUT
            while any(p.poll() is None for p in peers) and time.monotonic() < deadline:
                live.update(status_renderable(with_accounts(ledger, ledger.snapshot(peer_timeout=10.0))))
                time.sleep(0.5)
            live.update(status_renderable(with_accounts(ledger, ledger.snapshot(peer_timeout=10.0))))
        failed = [p for p in peers if p.returncode != 0]
        console.print()
        console.print(summary(ledger.snapshot(peer_timeout=10.0), peer_dirs, time.monotonic() - began))
        if failed:
            sys.exit(f"error: {len(failed)} peer(s) failed; logs in {args.workdir}")
    except KeyboardInterrupt:
        console.print("interrupted: stopping the coordinator and peers")
    finally:
        for process in reversed(processes):
            stop(process)


if __name__ == "__main__":
    main()
