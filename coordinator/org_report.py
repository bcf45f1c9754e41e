"""`coordinator report --org NAME`: a partner organization's statement of what it contributed.

Per peer of the org: samples, device-hours (the compute time its reports declare), credit and audits;
in total: the org's share of the run. Once a window has settled, credit is each peer's account
(coordinator/books/accounting.py: settled plus pending, ``credit_verified`` when nothing is pending);
before, reported samples. The statement says which. ``--since`` counts reports received from that
moment on (account credit is for the whole run and is shown whole).
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from coordinator.books import views
from coordinator.books.ledger import Ledger
from peer.errors import UserError

CSV_COLUMNS = ["org", "peer_id", "device", "first_report", "last_report", "reports", "samples", "device_hours",
               "credit", "credit_verified", "audits_passed", "audits_failed", "share_of_run"]


def parse_since(text: str | None) -> float | None:
    """A date (2026-11-28) or date and time (2026-11-28T14:30, UTC unless an offset is given) -> unix time."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(f"invalid --since {text!r}: use a date like 2026-11-28 or a time like 2026-11-28T14:30 "
                        f"(UTC unless it has an offset)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def org_statement(ledger: Ledger, org: str, since: float | None) -> dict:
    orgs = views.org_names(ledger)
    if org not in orgs:
        raise UserError(f"unknown org {org!r}; orgs in this run: {', '.join(orgs) or 'none yet'}")
    start = since if since is not None else 0.0
    peers = views.org_peers(ledger, org, start)
    run_samples = views.run_samples(ledger, start)
    books = ledger.accounts()
    settled = any(account.windows_decided for account in books.values())  # the run settled a window
    verified = settled and all(account.credit_pending == 0 for account in books.values())
    run_credit = sum(account.credit for account in books.values()) if settled else run_samples
    rows = []
    for peer in peers:
        account = books.get(peer["peer_id"])
        credit = (account.credit if account else 0.0) if settled else float(peer["samples"])
        rows.append({
            "org": org, "peer_id": peer["peer_id"], "device": peer["device"],
            "first_report": _iso(peer["first_report"]), "last_report": _iso(peer["last_report"]),
            "reports": peer["reports"], "samples": peer["samples"],
            "device_hours": round(peer["compute_seconds"] / 3600, 6), "credit": credit,
            "credit_verified": bool(account and account.credit_verified),
            "audits_passed": account.audits_passed if account else 0,
            "audits_failed": account.audits_failed if account else 0,
            "share_of_run": credit / run_credit if run_credit else 0.0,
        })
    samples = sum(row["samples"] for row in rows)
    credit = sum(row["credit"] for row in rows)
    return {
        "org": org,
        "run_id": ledger.meta("run_id"),
        "since": _iso(since),
        "generated": _iso(time.time()),
        "credit_basis": "verified credit (whole run)" if verified else
                        "settled and pending credit (whole run; pending is not verified yet)" if settled else
                        "reported samples (not verified)",
        "peers": rows,
        "totals": {
            "peers": len(rows), "samples": samples, "device_hours": round(sum(r["device_hours"] for r in rows), 6),
            "credit": credit, "share_of_run": credit / run_credit if run_credit else 0.0,
            "run_samples": run_samples, "run_credit": run_credit,
        },
        "timeline": views.org_timeline(ledger, org, start),
    }


def to_json(statement: dict) -> bytes:
    return (json.dumps(statement, indent=2) + "\n").encode()


def to_csv(statement: dict) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in statement["peers"]:
        writer.writerow(row)
    totals = statement["totals"]
    writer.writerow({"org": statement["org"], "peer_id": "TOTAL", "reports": sum(r["reports"] for r in statement["peers"]),
                     "samples": totals["samples"], "device_hours": totals["device_hours"], "credit": totals["credit"],
                     "credit_verified": bool(statement["peers"]) and all(r["credit_verified"]
                                                                         for r in statement["peers"]),
                     "audits_passed": sum(r["audits_passed"] for r in statement["peers"]),
                     "audits_failed": sum(r["audits_failed"] for r in statement["peers"]),
                     "share_of_run": totals["share_of_run"]})
    return buffer.getvalue().encode()


def to_png(statement: dict) -> bytes:
    """The org's cumulative samples over time, against the whole run's, and its share per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    timeline = statement["timeline"]
    moments = [datetime.fromtimestamp(t, timezone.utc) for t in timeline["time"]]
    org_total, run_total, org_cumulative, run_cumulative = 0, 0, [], []
    for org_samples, run_samples in zip(timeline["org_samples"], timeline["run_samples"]):
        org_total, run_total = org_total + org_samples, run_total + run_samples
        org_cumulative.append(org_total)
        run_cumulative.append(run_total)
    figure, (samples_axis, share_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                      gridspec_kw={"height_ratios": [2, 1]})
    samples_axis.plot(moments, run_cumulative, color="#9aa1ac", label="whole run")
    samples_axis.plot(moments, org_cumulative, color="#d1495b", linewidth=2, label=statement["org"])
    samples_axis.set_ylabel("samples (cumulative)")
    samples_axis.legend(loc="upper left")
    samples_axis.set_title(f"{statement['org']} in run '{statement['run_id']}': "
                           f"{statement['totals']['samples']:,} samples, "
                           f"{100 * statement['totals']['share_of_run']:.1f}% of the run")
    shares = [o / r if r else 0.0 for o, r in zip(timeline["org_samples"], timeline["run_samples"])]
    share_axis.plot(moments, [100 * s for s in shares], color="#2e86ab")
    share_axis.set_ylabel("share per epoch (%)")
    share_axis.set_ylim(0, 100)
    share_axis.set_xlabel("time (UTC)")
    figure.autofmt_xdate()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_report(data_dir: Path, org: str, since_text: str | None, format: str, out: Path | None,
                 store: str | None = None) -> bytes | None:
    """Build the statement; write it to ``out`` or return the bytes for stdout (png needs ``out``)."""
    if format == "png" and out is None:
        raise UserError("--format png needs --out FILE.png (a picture does not go to the terminal)")
    if out is not None and not Path(out).parent.is_dir():
        raise UserError(f"cannot write {out}: the directory {Path(out).parent} does not exist")
    since = parse_since(since_text)
    ledger = Ledger.open_existing(data_dir, store)
    try:
        statement = org_statement(ledger, org, since)
    finally:
        ledger.close()
    data = {"json": to_json, "csv": to_csv, "png": to_png}[format](statement)
    if out is None:
        return data
    Path(out).write_bytes(data)
    return None
