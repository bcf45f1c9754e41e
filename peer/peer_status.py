"""`peer status` and `peer leave`: what this data dir's peer is and did, and a clean way to stop it.

Both read only local files: the identity, the event log (events.jsonl) and peer.pid. Credit is what
the coordinator last told the peer (in heartbeat replies), so it is "as of" the last epoch.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from peer.errors import UserError
from peer.events import read_events
from peer.identity import KEY_FILE, load_or_create_identity
from peer.pidfile import running_peer


def _process_gone(pid: int, start_ticks: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] in ("Z", "X") or int(fields[19]) != start_ticks  # a zombie has exited already


def peer_status(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    if not (data_dir / KEY_FILE).exists():
        raise UserError(f"no peer in {data_dir} yet; join a run first ('peer join ADDRESS --token TOKEN'), "
                        f"or pass the --data-dir it used")
    identity = load_or_create_identity(data_dir)
    runs: dict[str, dict] = {}
    current = None
    for event in read_events(data_dir):
        if event["event"] == "joined":
            current = runs.setdefault(event["run_id"], {
                "run_id": event["run_id"], "org": event.get("org"), "coordinator": event.get("coordinator"),
                "first_joined": event["time"], "joins": 0, "epochs": 0, "samples": 0, "credit": None,
                "credit_verified": False, "audits_passed": 0, "last_epoch": None, "last_active": event["time"],
            })
            current["joins"] += 1
            current["last_active"] = event["time"]
        elif current is not None and event["event"] == "epoch":
            current["epochs"] += 1
            current["samples"] += event.get("samples", 0)
            current["last_epoch"] = event["epoch"]
            current["last_active"] = event["time"]
            if "credit" in event:
                current["credit"] = event["credit"]
                current["credit_verified"] = event.get("credit_verified", False)
                current["audits_passed"] = event.get("audits_passed", 0)
    running = running_peer(data_dir)
    return {
        "peer_id": identity.peer_id,
        "data_dir": str(data_dir),
        "running": running is not None,
        "pid": running["pid"] if running else None,
        "current_run": running.get("run_id") if running else None,
        "runs": sorted(runs.values(), key=lambda run: run["first_joined"]),
    }


def render_peer_status(status: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = (f"[green]running[/] (pid {status['pid']}, run '{status['current_run']}')" if status["running"]
             else "not running")
    console.print(f"peer [bold]{status['peer_id']}[/]  {state}  data dir {status['data_dir']}")
    if not status["runs"]:
        console.print("has not joined a run yet")
        return
    table = Table("run", "org", "coordinator", "joins", "epochs", "samples", "credit", "audits passed",
                  "last active", title="runs joined")
    for run in status["runs"]:
        credit = "-" if run["credit"] is None else f"{run['credit']:,.0f}" + ("" if run["credit_verified"] else "*")
        table.add_row(run["run_id"], run["org"] or "-", run["coordinator"] or "-", str(run["joins"]),
                      str(run["epochs"]), f"{run['samples']:,}", credit, str(run["audits_passed"]),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(run["last_active"])))
    console.print(table)
    if any(run["credit"] is not None and not run["credit_verified"] for run in status["runs"]):
        console.print("* unverified: reported samples, until the run's audits confirm them")


def ask_to_leave(data_dir: Path, timeout: float) -> dict:
    """SIGTERM the peer recorded in data_dir/peer.pid (it finishes its step, flushes reports, tells
    the coordinator it leaves) and wait until its process is gone."""
    record = running_peer(data_dir)
    if record is None:
        raise UserError(f"no peer is running from {data_dir}")
    pid, ticks = int(record["pid"]), int(record["start_ticks"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return record
    except PermissionError:
        raise UserError(f"not allowed to signal the peer (pid {pid}); run 'peer leave' as the user that started it")
    deadline = time.monotonic() + timeout
    while not _process_gone(pid, ticks):
        if time.monotonic() > deadline:
            raise UserError(f"the peer (pid {pid}) did not leave within {timeout:.0f}s; it may still be finishing "
                            f"an averaging round: wait, or run 'peer leave' again to stop it at once")
        time.sleep(0.2)
    return record
