"""Read models of the run for statements and charts (`coordinator report`, the dashboard's history).

Functions of a Ledger, so their callers hold no SQL; a peer's account is coordinator/books/accounting.py's,
the run's epoch run_epoch.py's and the live peers and swarm rate Ledger.summarize's.
"""

from __future__ import annotations

from coordinator.books.connection import greatest, json_number


def org_names(ledger) -> list[str]:
    return [row["name"] for row in ledger._read("SELECT name FROM orgs ORDER BY name")]


def org_peers(ledger, org: str, since: float) -> list[dict]:
    """Per peer of ``org``: device, reports, samples, compute seconds, first and last report received
    from ``since`` on; most samples first."""
    return [dict(row) for row in ledger._read(
        """SELECT p.peer_id, p.device, COUNT(r.report_id) AS reports, COALESCE(SUM(r.samples), 0) AS samples,
                  COALESCE(SUM(r.compute_seconds), 0) AS compute_seconds, MIN(r.received) AS first_report,
                  MAX(r.received) AS last_report
           FROM peers p LEFT JOIN reports r ON r.peer_id = p.peer_id AND r.received >= ?
           WHERE p.org = ? GROUP BY p.peer_id ORDER BY samples DESC, p.peer_id""", (since, org))]


def run_samples(ledger, since: float = 0.0) -> int:
    """Samples reported by everyone from ``since`` on."""
    return ledger._read("SELECT COALESCE(SUM(samples), 0) AS s FROM reports WHERE received >= ?", (since,))[0]["s"]


def org_timeline(ledger, org: str, since: float) -> dict[str, list]:
    """Per epoch: when it ended, the org's samples and everyone's (for the plot)."""
    rows = ledger._read(
        """SELECT r.epoch, MAX(r.received) AS ended, SUM(CASE WHEN p.org = ? THEN r.samples ELSE 0 END) AS org_samples,
                  SUM(r.samples) AS run_samples
           FROM reports r JOIN peers p ON p.peer_id = r.peer_id WHERE r.received >= ?
           GROUP BY r.epoch ORDER BY r.epoch""",
        (org, since),
    )
    return {"epoch": [r["epoch"] for r in rows], "time": [r["ended"] for r in rows],
            "org_samples": [r["org_samples"] for r in rows], "run_samples": [r["run_samples"] for r in rows]}


def epoch_totals(ledger, limit: int) -> list[dict]:
    """The last ``limit`` epochs reported, oldest first: samples, sample-weighted loss, mean held-out
    accuracy and when its last report arrived."""
    rows = ledger._read(
        f"""SELECT epoch, SUM(samples) AS samples, SUM(samples * loss) / {greatest(ledger.dialect)}(SUM(samples), 1)
                  AS loss, AVG({json_number(ledger.dialect, 'metrics', 'accuracy')}) AS accuracy, MAX(received) AS ended
           FROM reports GROUP BY epoch ORDER BY epoch DESC LIMIT ?""", (limit,))
    return [dict(row) for row in rows[::-1]]


def first_join(ledger) -> float | None:
    return ledger._read("SELECT MIN(joined) AS t FROM peers")[0]["t"]
