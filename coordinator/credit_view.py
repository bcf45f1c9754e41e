"""`coordinator ledger`: the credit rows as a rich table, JSON or CSV."""

from __future__ import annotations

import csv
import json
import sys

from rich.console import Console
from rich.table import Table

PEER_COLUMNS = ["peer", "org", "samples_provisional", "samples_settled", "flops_settled", "windows_forfeited",
                "audits_passed", "audits_failed", "audits_inconclusive", "strikes", "banned", "ban_reason"]
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
        for column in columns:
            table.add_column(column.replace("_", " "), justify="left" if column in ("peer", "org", "ban_reason")
                             else "right")
        for row in rows:
            table.add_row(*[f"{row[c]:.3g}" if c == "flops_settled" else str(row[c] if row[c] is not None else "")
                            for c in columns])
        Console().print(table)
