"""Rich tables of a run's state (the dict of Ledger.snapshot), for `coordinator status` and the demo."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table


def status_renderable(state: dict) -> Group:
    loss = "-" if state["loss"] is None else f"{state['loss']:.4f}"
    accuracy = state["metrics"].get("accuracy")
    headline = (
        f"run [bold]{state['run_id']}[/]  epoch [bold]{state['epoch']}[/]  samples {state['samples']:,}  "
        f"loss {loss}" + (f"  held-out accuracy {accuracy:.3f}" if accuracy is not None else "")
        + f"  swarm {state['swarm_samples_per_second']:.0f} samples/s"
    )
    peers = Table("peer", "org", "device", "epoch", "samples", "credit", "samples/s", "last seen", "alive",
                  title="peers")
    for peer in state["peers"]:
        credit = "-" if "credit" not in peer else f"{peer['credit']:,.0f}" + ("" if peer["credit_verified"] else "*")
        peers.add_row(
            peer["id"], peer["org"], peer["device"], str(peer["epoch"]), f"{peer['samples']:,}", credit,
            f"{peer['samples_per_second']:.0f}", f"{peer['last_seen_seconds_ago']:.0f}s ago",
            "[green]yes[/]" if peer["alive"] else "[red]no[/]",
        )
    orgs = Table("org", "peers", "samples", title="organizations")
    for org in state["orgs"]:
        orgs.add_row(org["name"], str(org["peers"]), f"{org['samples']:,}")
    pending = any("credit" in peer and not peer["credit_verified"] for peer in state["peers"])
    note = ["* credit: includes pending samples, not verified yet (their window has not settled)"] if pending else []
    return Group(headline, peers, orgs, *note)


def render_status(state: dict) -> None:
    Console().print(status_renderable(state))
