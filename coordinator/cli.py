"""The operator's CLI: `coordinator serve | token issue | status`."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from coordinator.ledger import Ledger
from coordinator.server import join_command, read_info, serve
from peer.cli_support import new_app, run_app

app = new_app("coordinator", "Host a potluck run: admit volunteers, track progress, keep the credit ledger.")
token_app = typer.Typer(help="Join tokens for organizations.", no_args_is_help=True)
app.add_typer(token_app, name="token")
ledger_app = typer.Typer(help="The credit ledger: provisional and settled credit, audits; `verify` checks it.")
app.add_typer(ledger_app, name="ledger")

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



@app.command("serve")
def serve_command(
    run: Annotated[Path, typer.Option("--run", help="The run config (run.toml).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on (gRPC and the swarm's DHT node).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port; 0 picks a free one.", min=0, max=65535)] = 7450,
    dht_port: Annotated[int, typer.Option(help="DHT port; 0 picks a free one.", min=0, max=65535)] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
):
    """Start the coordinator: ledger, swarm bootstrap and gRPC service; prints the join command."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    serve(run, data_dir, host, port, dht_port)


@token_app.command("issue")
def token_issue(
    org: Annotated[str, typer.Option("--org", help="Organization the token admits peers into (created if new).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    format: Annotated[TextOrJson, typer.Option("--format")] = TextOrJson.text,
):
    """Print a new join token for an organization."""
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


class By(str, Enum):
    peer = "peer"
    org = "org"


class TableJsonCsv(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@ledger_app.callback(invoke_without_command=True)
def ledger_command(
    ctx: typer.Context,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    by: Annotated[By, typer.Option("--by", help="One row per peer or per organization.")] = By.peer,
    format: Annotated[TableJsonCsv, typer.Option("--format")] = TableJsonCsv.table,
):
    """Credit per peer or org: provisional and settled samples, audits, strikes, bans."""
    if ctx.invoked_subcommand is not None:
        return
    from coordinator.credit_view import print_credit

    print_credit(open_credit(data_dir), by.value, format.value)


@ledger_app.command("verify")
def ledger_verify(data_dir: DataDir = DEFAULT_DATA_DIR):
    """Re-check the hash-chained contribution log and every report signature; exit 1 on tampering."""
    problems = open_credit(data_dir).verify()
    for problem in problems:
        print(f"tampered: {problem}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)
    print("contribution log intact")


def open_credit(data_dir: Path):
    """The credit tables of an existing ledger (the run's [verification] settings come from its meta)."""
    from coordinator.credit import Credit
    from peer.runconfig import VerificationConfig

    ledger = Ledger.open_existing(data_dir)
    return Credit(ledger.path, VerificationConfig(), ledger.meta("run_id") or "")


def main() -> None:
    run_app(app)
