"""A peer's account (credit, audits, ban), read from the ledger's own tables: the one definition that the
heartbeat panel, `coordinator status`, `coordinator report` and the dashboard all show.

Credit is *settled* (windows the auditor settled: coordinator/books/credit.py's settlements) plus
*pending*: the samples of reports in windows not yet decided (credited samples once the credit store
has checked the report, reported samples until then). Pending credit is not verified, so an account
is ``credit_verified`` only when nothing is pending and some window was decided; before the first
window settles a peer's account shows its reported samples as pending, not "credit 0, verified".
A banned peer has nothing pending (its open windows are forfeited with the ban).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from peer.runconfig import VerificationConfig

_PASSED, _FAILED = "pass", "fail"  # audit verdicts (coordinator/books/credit.py); any other is inconclusive


@dataclass
class Account:
    credit: float = 0.0  # settled + pending
    credit_verified: bool = False
    credit_settled: float = 0.0
    credit_pending: float = 0.0
    windows_decided: int = 0  # settled or forfeited
    audits_passed: int = 0
    audits_failed: int = 0
    audits_pending: int = 0  # inconclusive verdicts
    banned: bool = False

    @property
    def audit_status(self) -> str:
        if self.banned:
            return "banned"
        if self.audits_failed:
            return f"{self.audits_failed} failed"
        if self.audits_passed:
            return f"{self.audits_passed} passed"
        return "pending" if self.audits_pending else "not audited"

    def as_dict(self) -> dict:
        return {**asdict(self), "audit_status": self.audit_status}


def window_epochs(read) -> int:
    """The run's settlement window (the [verification] the credit store recorded in meta, else the default)."""
    rows = read("SELECT value FROM meta WHERE key='verification'")
    settings = json.loads(rows[0]["value"]) if rows else {}
    return int(settings.get("window_epochs", VerificationConfig().window_epochs))


def accounts(read, peer_id: str | None = None) -> dict[str, Account]:
    """peer id -> Account for every admitted peer; ``read`` is a store's ``_read`` (Ledger.accounts).

    With ``peer_id``, only that peer's account (a heartbeat's reply), read by the tables' peer_id keys."""
    own, args = ("WHERE p.peer_id=?", (peer_id,)) if peer_id is not None else ("", ())
    rows = read(
        f"""SELECT p.peer_id, COALESCE(st.banned, 0) AS banned,
               (SELECT COALESCE(SUM(s.samples), 0) FROM settlements s WHERE s.peer_id = p.peer_id) AS settled,
               (SELECT COUNT(*) FROM settlements s WHERE s.peer_id = p.peer_id) AS decided,
               (SELECT COALESCE(SUM(c.credited_samples), 0) FROM credit_reports c WHERE c.peer_id = p.peer_id
                  AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.peer_id = c.peer_id AND s."window" = c.epoch / ?))
               + (SELECT COALESCE(SUM(r.samples), 0) FROM reports r WHERE r.peer_id = p.peer_id
                  AND NOT EXISTS (SELECT 1 FROM credit_reports c WHERE c.report_id = r.report_id)
                  AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.peer_id = r.peer_id AND s."window" = r.epoch / ?))
                 AS pending
           FROM peers p LEFT JOIN standing st ON st.peer_id = p.peer_id {own}""",
        (window_epochs(read),) * 2 + args,
    )
    result: dict[str, Account] = {}
    for row in rows:
        pending = 0.0 if row["banned"] else float(row["pending"])
        result[row["peer_id"]] = Account(
            credit=float(row["settled"]) + pending, credit_verified=pending == 0 and row["decided"] > 0,
            credit_settled=float(row["settled"]), credit_pending=pending, windows_decided=row["decided"],
            banned=bool(row["banned"]))
    only = "WHERE peer_id=?" if peer_id is not None else ""
    for peer, verdict, count in read(f"SELECT peer_id, verdict, COUNT(*) FROM audits {only} GROUP BY peer_id, verdict",
                                     args):
        account = result.get(peer)
        if account is None:  # audits of an identity that never joined (a forged report's claimed peer)
            continue
        if verdict == _PASSED:
            account.audits_passed += count
        elif verdict == _FAILED:
            account.audits_failed += count
        else:
            account.audits_pending += count
    return result


def banned_peers(read) -> set[str]:
    return {row[0] for row in read("SELECT peer_id FROM standing WHERE banned <> 0")}


def org_strikes(read) -> dict[str, int]:
    """org -> strikes on its standing (one per banned peer of the org)."""
    return {row["org"]: row["n"] for row in read("SELECT org, COUNT(*) AS n FROM org_strikes GROUP BY org")}


def recent_audits(read, limit: int = 20) -> list[dict]:
    rows = read("SELECT * FROM audits ORDER BY at DESC, id DESC LIMIT ?", (limit,))
    return [dict(row) for row in rows]


def recent_bans(read, limit: int = 20) -> list[dict]:
    return [dict(row) for row in read("SELECT peer_id, reason, strikes, at FROM standing WHERE banned <> 0 "
                                      "ORDER BY at DESC LIMIT ?", (limit,))]
