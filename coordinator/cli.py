"""The operator's CLI: `coordinator serve | status | org add|list|remove | token issue|list|revoke`."""

from __future__ import annotations

import json
import logging
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coordinator.books.ledger import Ledger
from peer.cli_support import new_app, run_app
from peer.errors import UserError

app = new_app("coordinator", "Host a potluck run: admit volunteers, track progress, keep the credit ledger.")
token_app = typer.Typer(help="Signed join tokens for organizations.", no_args_is_help=True)
app.add_typer(token_app, name="token")
ledger_app = typer.Typer(help="The credit ledger: provisional and settled credit, audits; `verify` checks it.")
app.add_typer(ledger_app, name="ledger")
org_app = typer.Typer(help="Organizations taking part in the run.", no_args_is_help=True)
app.add_typer(org_app, name="org")

DEFAULT_DASHBOARD_PORT = 7451
DEFAULT_DATA_DIR = Path.home() / ".potluck" / "coordinator"
DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="POTLUCK_COORDINATOR_DIR", help="Where the ledger and keys live.")
]
StoreUrl = Annotated[Optional[str], typer.Option(
    "--store", envvar="POTLUCK_COORDINATOR_STORE",
    help="The books in a PostgreSQL database: postgresql://USER@HOST:PORT/DB (pip install 'potluck[postgresql]'); "
         "default: the sqlite file ledger.sqlite in --data-dir.")]


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
    store: StoreUrl = None,
    host: Annotated[str, typer.Option(help="Address to listen on (gRPC and the swarm's DHT node).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port; 0 picks a free one.", min=0, max=65535)] = 7450,
    dht_port: Annotated[int, typer.Option(help="DHT port; 0 picks a free one.", min=0, max=65535)] = 0,
    dashboard_port: Annotated[int, typer.Option(help="HTTP port of the dashboard (/, /api/v1/state, /metrics); "
                                                "0 picks a free one.", min=0, max=65535)] = DEFAULT_DASHBOARD_PORT,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard", help="Serve the dashboard.")] = True,
    cert: Annotated[Optional[Path], typer.Option(help="Your own TLS certificate (PEM); default: a self-signed one.")] = None,
    key: Annotated[Optional[Path], typer.Option(help="The private key (PEM) of --cert.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure",
        help="Serve plaintext gRPC. RISK: tokens, reports and replies can be read and altered by anyone on the "
             "network path. Only for a trusted, isolated network.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
):
    """Start the coordinator: ledger, swarm bootstrap and gRPC service (TLS); prints the join command."""
    from coordinator.serve_checks import check_serve_args

    # the cheap refusals first: torch, hivemind and gRPC take seconds to import
    check_serve_args(run, data_dir, host, {"--port": port, "--dht-port": dht_port,
                                           "--dashboard-port": dashboard_port if dashboard else 0},
                     insecure, cert, key, store)
    from coordinator.tensor_sharing import share_tensors_by_file_descriptor

    share_tensors_by_file_descriptor()  # before hivemind loads (and for the children serve starts)
    from coordinator.server import Transport, serve

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    serve(run, data_dir, host, port, dht_port, Transport(insecure, cert, key), dashboard_port if dashboard else None,
          store)


def _signing_key(data_dir: Path):
    from coordinator.serve_info import KEY_FILE
    from peer.identity import load_or_create_identity

    if not (Path(data_dir) / KEY_FILE).exists():
        raise UserError(f"no coordinator key in {data_dir}; start 'coordinator serve' there once first")
    return load_or_create_identity(data_dir, KEY_FILE)


@token_app.command("issue")
def token_issue(
    org: Annotated[str, typer.Option("--org", help="Organization the token admits peers into ('org add' it first).")],
    expires: Annotated[str, typer.Option(help="Lifetime: 90m, 12h, 7d, 2w, or 'never'.")] = "7d",
    max_peers: Annotated[int, typer.Option(help="How many peer identities may use it (0: any number).", min=0)] = 1,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
    format: Annotated[TextOrJson, typer.Option("--format")] = TextOrJson.text,
):
    """Print a new signed join token for an organization."""
    from coordinator import tokens
    from coordinator.serve_info import join_command, read_info

    try:
        ttl = tokens.parse_duration(expires)
    except ValueError as error:
        raise UserError(f"--expires: {error}") from None
    ledger = Ledger.open_existing(data_dir, store)
    identity = _signing_key(data_dir)
    token, claims = tokens.issue(ledger, identity.private_key, ledger.meta("run_id"), org, ttl, max_peers)
    info = read_info(data_dir) or {}
    command = join_command(info.get("address", "<coordinator-address>"), token, info.get("tls_fingerprint"))
    if format is TextOrJson.json:
        print(json.dumps({"id": claims.id, "token": token, "org": claims.org, "expires": _when(claims.expires),
                          "max_peers": claims.max_peers, "join_command": command}))
    else:
        print(f"token for org '{claims.org}' (id {claims.id}, expires {_when(claims.expires)}, "
              f"{claims.max_peers or 'any number of'} peer(s)):\n  {token}\njoin with:\n  {command}")


def _when(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@token_app.command("list")
def token_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
    format: Annotated[TableOrJson, typer.Option("--format")] = TableOrJson.table,
):
    """List issued tokens: id, org, expiry, use limit, identities bound, revoked."""
    rows = [
        {"id": t["id"], "org": t["org"], "created": _when(t["created"]), "expires": _when(t["expires"]),
         "max_peers": t["max_peers"], "peers": t["peers"], "revoked": t["revoked"],
         "expired": bool(t["expires"]) and t["expires"] < time.time()}
        for t in Ledger.open_existing(data_dir, store).tokens()
    ]
    _print_rows(format, "tokens", rows, ["id", "org", "expires", "max_peers", "peers", "revoked", "expired"])


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (see 'token list').")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
):
    """Revoke a token; the peers it admitted are evicted (coordinator and swarm) within seconds."""
    evicted = Ledger.open_existing(data_dir, store).revoke_token(token_id)
    print(f"token {token_id} revoked; {evicted} peer(s) evicted")


@org_app.command("add")
def org_add(
    name: Annotated[str, typer.Argument(help="The organization's name.")],
    max_peers: Annotated[int, typer.Option(help="Most peers of this org active at once (0: no quota).", min=0)] = 0,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
):
    """Add an organization (or change its quota); then issue it tokens."""
    Ledger.open_existing(data_dir, store).add_org(name, max_peers)
    print(f"org '{name.strip()}' ready" + (f" (at most {max_peers} active peers)" if max_peers else ""))


@org_app.command("list")
def org_list(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
    format: Annotated[TableOrJson, typer.Option("--format")] = TableOrJson.table,
):
    """List organizations with their quota, peers, active tokens and strikes (one per banned peer)."""
    ledger = Ledger.open_existing(data_dir, store)  # first: a wrong --data-dir answers before torch loads
    strikes = ledger.org_strikes()
    rows = [
        {"name": o["name"], "created": _when(o["created"]), "max_peers": o["max_peers"], "peers": o["peers"],
         "active_tokens": o["active_tokens"], "strikes": strikes.get(o["name"], 0), "removed": o["removed"]}
        for o in ledger.orgs()
    ]
    _print_rows(format, "orgs", rows, ["name", "max_peers", "peers", "active_tokens", "strikes", "removed"])


@org_app.command("remove")
def org_remove(
    name: Annotated[str, typer.Argument(help="The organization to remove.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
):
    """Remove an organization: its tokens are revoked and its peers evicted; its credit history stays."""
    evicted = Ledger.open_existing(data_dir, store).remove_org(name)
    print(f"org '{name}' removed; {evicted} peer(s) evicted")


def _print_rows(format: TableOrJson, title: str, rows: list[dict], columns: list[str]) -> None:
    """All fields as JSON for scripts, or the named columns as a table for people."""
    if format is TableOrJson.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(title, rows, columns)


PASTED_COLUMNS = {"id", "peer", "org", "name"}


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        # what a person pastes into another command (an id, a name) is never cut or wrapped
        whole = column in PASTED_COLUMNS
        width = max([len(str(row[column])) for row in rows if row[column] is not None], default=0)
        table.add_column(column, no_wrap=whole, min_width=width if whole else None)
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    console = Console()
    Console(width=max(console.width, 200) if not console.is_terminal else None).print(table)


@app.command("status")
def status_command(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store: StoreUrl = None,
    format: Annotated[TableOrJson, typer.Option("--format")] = TableOrJson.table,
    peer_timeout: Annotated[float, typer.Option(help="Seconds of silence after which a peer is not alive.")] = 10.0,
):
    """Show the run: epoch, samples, loss, peers and organizations."""
    from coordinator.run_view import with_accounts
    from coordinator.status import render_status

    ledger = Ledger.open_existing(data_dir, store)
    state = with_accounts(ledger, ledger.snapshot(peer_timeout))
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
    store: StoreUrl = None,
    by: Annotated[By, typer.Option("--by", help="One row per peer or per organization.")] = By.peer,
    format: Annotated[TableJsonCsv, typer.Option("--format")] = TableJsonCsv.table,
):
    """Credit per peer or org: provisional and settled samples, audits, strikes, bans; per peer, each
    window's state and detection confidence (all of them in --format json)."""
    if ctx.invoked_subcommand is not None:
        return
    from coordinator.credit_view import print_credit

    print_credit(open_credit(data_dir, store), by.value, format.value)


@ledger_app.command("verify")
def ledger_verify(data_dir: DataDir = DEFAULT_DATA_DIR, store: StoreUrl = None):
    """Re-check the hash-chained contribution log and every report signature; exit 1 on tampering."""
    problems = open_credit(data_dir, store).verify()
    for problem in problems:
        print(f"tampered: {problem}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)
    print("contribution log intact")


def open_credit(data_dir: Path, store: str | None = None):
    """The credit tables of an existing ledger (the run's [verification] settings come from its meta)."""
    ledger = Ledger.open_existing(data_dir, store)  # first: a wrong --data-dir answers before torch loads
    from coordinator.books.credit import Credit
    from peer.runconfig import VerificationConfig

    verification = VerificationConfig(**json.loads(ledger.meta("verification") or "{}"))
    return Credit(ledger.target, verification, ledger.meta("run_id") or "")


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
    store: StoreUrl = None,
    since: Annotated[Optional[str], typer.Option(help="Count work from this date or time on (ISO, UTC), "
                                                 "e.g. 2026-11-28 or 2026-11-28T14:30.")] = None,
    format: Annotated[ReportFormat, typer.Option("--format", help="csv or json (stdout unless --out), "
                                                 "png (a plot, needs --out).")] = ReportFormat.json,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
):
    """An organization's statement: its peers, samples, credit, device-hours and share of the run."""
    import sys

    from coordinator.org_report import write_report

    data = write_report(data_dir, org, since, format.value, out, store)
    if data is None:
        print(f"wrote the {format.value} report of org '{org}' to {out}")
    else:
        sys.stdout.buffer.write(data)


def main() -> None:
    run_app(app)
