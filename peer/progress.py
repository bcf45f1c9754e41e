"""What a volunteer sees while training: a live rich panel on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class Progress:
    epoch: int = 0
    loss: float | None = None
    accuracy: float | None = None
    local_samples_per_second: float = 0.0
    swarm_samples_per_second: float = 0.0
    peers: int = 0
    samples: int = 0
    coordinator_reachable: bool = True
    credit: float = 0.0
    credit_verified: bool = False
    audits_passed: int = 0
    audits_failed: int = 0
    client_mode: bool = False


class ProgressDisplay:
    """Live panel when stdout is a terminal; otherwise one line per finished epoch."""

    def __init__(self, peer_id: str, run_id: str, mode: str = "auto"):
        self.title = f"potluck peer {peer_id} · run {run_id}"
        self.live_mode = mode == "live" or (mode == "auto" and sys.stdout.isatty())
        self.quiet = mode in ("quiet", "json")  # json: the event lines are the output
        self._live: Live | None = None
        self._last_refresh = 0.0

    def __enter__(self) -> "ProgressDisplay":
        if self.live_mode:
            self._live = Live(self._table(Progress()), console=Console(), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _table(self, p: Progress) -> Table:
        table = Table(title=self.title, show_header=False)
        table.add_row("epoch", str(p.epoch))
        table.add_row("loss", "-" if p.loss is None else f"{p.loss:.4f}")
        table.add_row("held-out accuracy", "-" if p.accuracy is None else f"{p.accuracy:.3f}")
        table.add_row("local samples/s", f"{p.local_samples_per_second:,.0f}")
        table.add_row("swarm samples/s", f"{p.swarm_samples_per_second:,.0f}")
        table.add_row("peers", str(p.peers))
        table.add_row("samples contributed", f"{p.samples:,}")
        table.add_row("credit earned", f"{p.credit:,.0f}" + ("" if p.credit_verified else " (unverified)"))
        table.add_row("audits passed", f"{p.audits_passed}" + (f" [red]({p.audits_failed} failed)[/]"
                                                              if p.audits_failed else ""))
        if p.client_mode:
            table.add_row("mode", "[yellow]client (not reachable by other peers)[/]")
        table.add_row("coordinator", "connected" if p.coordinator_reachable else "[yellow]reconnecting…[/]")
        return table

    def update(self, p: Progress) -> None:
        if self._live is not None and time.monotonic() - self._last_refresh > 0.25:
            self._live.update(self._table(p))
            self._last_refresh = time.monotonic()

    def epoch_done(self, p: Progress) -> None:
        if self._live is not None:
            self._live.update(self._table(p))
        elif not self.quiet:
            accuracy = "" if p.accuracy is None else f" accuracy {p.accuracy:.3f}"
            loss = "-" if p.loss is None else f"{p.loss:.4f}"  # a round can end before any report of this peer's
            print(
                f"epoch {p.epoch} loss {loss}{accuracy} local {p.local_samples_per_second:.0f} samples/s "
                f"swarm {p.swarm_samples_per_second:.0f} samples/s peers {p.peers} credit {p.credit:.0f}",
                flush=True,
            )

    def message(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text)
        elif not self.quiet:
            print(text, flush=True)
