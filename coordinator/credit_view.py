"""`coordinator ledger`: the credit rows as a rich table, JSON or CSV.

JSON rows carry every window of a peer (state, micro-batches, audited, detection confidence); the
table shows the last few compactly, e.g. ``3 settled 99.4% · 4 open 62.0%``.
"""

from __future__ import annotations

import csv
import json
import sys

from rich.console import Console
from rich.table import Table

PEER_COLUMNS = ["peer", "org", "samples_provisional", "samples_settled", "samples_unverified", "flops_settled",
                "windows_forfeited", "audits_passed", "audits_failed", "audits_inconclusive", "strikes", "banned",
                "ban_reason"]
TABLE_WINDOWS = 3  # windows per peer shown in the table (the newest)
ORG_COLUMNS = ["org", "peers", "samples_provisional", "samples_settled", "flops_settled", "audits_passed",
               "audits_failed", "strikes", "banned"]


def print_credit(credit, by: str, format: str) -> None:
    rows = credit.peer_rows() if by == "peer" else credit.org_rows()
    columns = PEER_COLUMNS if by == "peer" else ORG_COLUMNS
    if format == "json":
        print(json.dumps(rows, indent=2))
    elif format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = Table(title=f"credit per {by}")
        if by == "peer":
            columns = [*columns, "windows"]
            rows = [{**row, "windows": compact_windows(row["windows"])} for row in rows]
        for column in columns:
            table.add_column(column.replace("_", " "), justify="left" if column in ("peer", "org", "ban_reason", "windows")
                             else "right")
        for row in rows:
            table.add_row(*[f"{row[c]:.3g}" if c == "flops_settled" else str(row[c] if row[c] is not None else "")
                            for c in columns])
        Console().print(table)


def compact_windows(windows: list[dict], last: int = TABLE_WINDOWS) -> str:
    """The newest windows as 'N state confidence%', e.g. '3 settled 99.4% · 4 open 62.0%'."""
    shown = [f"{w['window']} {w['state']} {100 * w['confidence']:.1f}%" for w in windows[-last:]]
    return ("… " if len(windows) > last else "") + " · ".join(shown)
