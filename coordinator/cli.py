"""The operator's CLI: `coordinator serve | token issue | status`."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coordinator.ledger import Ledger
from peer.cli_support import new_app, run_app

app = new_app("coordinator", "Host a potluck run: admit volunteers, track progress, keep the credit ledger.")
token_app = typer.Typer(help="Join tokens for organizations.", no_args_is_help=True)
app.add_typer(token_app, name="token")

DEFAULT_DASHBOARD_PORT = 7451
DEFAULT_DATA_DIR = Path.home() / ".potluck" / "coordinator"
DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="POTLUCK_COORDINATOR_DIR", help="Where the ledger and keys live.")
]


class TextOrJson(str, Enum):
    text = "text"
    json = "json"


class TableOrJson(str, Enum):
    table = "table"
    json = "json"


class ReportFormat(str, Enum):
    csv = "csv"
    json = "json"
    png = "png"


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    torch = "torch"



@app.command("serve")
def serve_command(
    run: Annotated[Path, typer.Option("--run", help="The run config (run.toml).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on (gRPC and the swarm's DHT node).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port; 0 picks a free one.", min=0, max=65535)] = 7450,
    dht_port: Annotated[int, typer.Option(help="DHT port; 0 picks a free one.", min=0, max=65535)] = 0,
    dashboard_port: Annotated[int, typer.Option(help="HTTP port of the dashboard (/, /api/v1/state, /metrics); "
                                                "0 picks a free one.", min=0, max=65535)] = DEFAULT_DASHBOARD_PORT,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard", help="Serve the dashboard.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
):
    """Start the coordinator: ledger, swarm bootstrap and gRPC service; prints the join command."""
    from coordinator.server import serve

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    serve(run, data_dir, host, port, dht_port, dashboard_port if dashboard else None)


@token_app.command("issue")
def token_issue(
    org: Annotated[str, typer.Option("--org", help="Organization the token admits peers into (created if new).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    format: Annotated[TextOrJson, typer.Option("--format")] = TextOrJson.text,
):
    """Print a new join token for an organization."""
    from coordinator.server import join_command, read_info

    ledger = Ledger.open_existing(data_dir)
    token_id, token = ledger.issue_token(org)
    info = read_info(data_dir)
    address = info["address"] if info else "<coordinator-address>"
    command = join_command(address, token)
    if format is TextOrJson.json:
        print(json.dumps({"id": token_id, "token": token, "org": org.strip(), "join_command": command}))
    else:
        print(f"token for org '{org.strip()}' (id {token_id}):\n  {token}\njoin with:\n  {command}")


@app.command("status")
def status_command(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    format: Annotated[TableOrJson, typer.Option("--format")] = TableOrJson.table,
    peer_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a peer is not alive.")] = 10.0,
):
    """Show the run: epoch, samples, loss, peers and organizations."""
    from coordinator.status import render_status

    state = Ledger.open_existing(data_dir).snapshot(peer_timeout)
    if format is TableOrJson.json:
        print(json.dumps(state, indent=2))
    else:
        render_status(state)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Argument(help="File to write the model to.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    format: Annotated[ExportFormat, typer.Option("--format", help="safetensors, or a torch.save dict "
                                                 "{'epoch', 'run_id', 'state_dict'} (load it with weights_only=True).")]
    = ExportFormat.safetensors,
):
    """Write the run's latest checkpoint (the swarm's averaged model) for use outside potluck."""
    from coordinator.export import export_latest

    manifest = export_latest(data_dir, out, format.value)
    print(f"exported epoch {manifest.epoch} of run '{manifest.run_id}' to {out} ({format.value})")


@app.command("report")
def report_command(
    org: Annotated[str, typer.Option("--org", help="The organization to report on.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    since: Annotated[Optional[str], typer.Option(help="Count work from this date or time on (ISO, UTC), "
                                                 "e.g. 2026-11-28 or 2026-11-28T14:30.")] = None,
    format: Annotated[ReportFormat, typer.Option("--format", help="csv or json (stdout unless --out), "
                                                 "png (a plot, needs --out).")] = ReportFormat.json,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
):
    """An organization's statement: its peers, samples, credit, device-hours and share of the run."""
    import sys

    from coordinator.org_report import write_report

    data = write_report(data_dir, org, since, format.value, out)
    if data is None:
        print(f"wrote the {format.value} report of org '{org}' to {out}")
    else:
        sys.stdout.buffer.write(data)


def main() -> None:
    run_app(app)
