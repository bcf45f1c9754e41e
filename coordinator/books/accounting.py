"""Credit, audits and bans per peer, for the displays (dashboard, heartbeat panel, org reports).

The verification work (audits, settled credit) and admission work (bans) own their ledger tables;
this module only reads them, and tolerates their absence: without audit data a peer's credit is its
reported samples, marked unverified, and its audit status is "not audited". It recognises the tables
by name and the columns it needs (see ``_AUDIT_TABLES`` and friends), so it keeps working while
those schemas grow.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass

_AUDIT_TABLES = ("audits", "audit_verdicts")
_CREDIT_TABLES = ("settlements", "credit", "credits", "settled_credit")  # settlements: coordinator/books/credit.py
_BAN_TABLES = ("bans", "banned_peers")
_PASSED = {"pass", "passed", "ok", "verified", "honest"}
_FAILED = {"fail", "failed", "strike", "cheat", "mismatch", "rejected"}
_TIME_COLUMNS = ("at", "created", "time", "decided", "recorded", "banned_at", "received")


@dataclass
class Account:
    credit: float = 0.0
    credit_verified: bool = False
    audits_passed: int = 0
    audits_failed: int = 0
    audits_pending: int = 0
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


def _columns(query, table: str) -> set[str]:
    try:
        return {row[1] for row in query(f"PRAGMA table_info({table})")}
    except sqlite3.Error:
        return set()


def _first_table(query, names: tuple[str, ...], needs: set[str]) -> tuple[str, set[str]] | None:
    for name in names:
        columns = _columns(query, name)
        if needs <= columns:
            return name, columns
    return None


def _pick(columns: set[str], choices: tuple[str, ...]) -> str | None:
    return next((c for c in choices if c in columns), None)


def accounts(query, peer_id: str | None = None) -> dict[str, Account]:
    """peer id -> Account; ``query`` is Ledger.query (or any ``(sql, args) -> rows`` function).

    With ``peer_id``, only that peer's account (a heartbeat's reply), read by the tables' peer_id indexes.
    """
    result: dict[str, Account] = {}
    only, args = ("WHERE peer_id=?", (peer_id,)) if peer_id is not None else ("", ())
    own = "WHERE p.peer_id=?" if peer_id is not None else ""
    for row in query("SELECT p.peer_id, COALESCE(SUM(r.samples), 0) FROM peers p LEFT JOIN reports r "
                     f"ON r.peer_id = p.peer_id {own} GROUP BY p.peer_id", args):
        result[row[0]] = Account(credit=float(row[1]))
    credit = _first_table(query, _CREDIT_TABLES, {"peer_id"})
    if credit is not None:
        name, columns = credit
        amount = _pick(columns, ("credit", "verified_samples", "samples"))
        if amount is not None:
            for peer, total in query(f"SELECT peer_id, SUM({amount}) FROM {name} {only} GROUP BY peer_id", args):
                account = result.setdefault(peer, Account())
                account.credit, account.credit_verified = float(total or 0), True
            for account in result.values():
                if not account.credit_verified:
                    account.credit, account.credit_verified = 0.0, True  # nothing verified yet
    audits = _first_table(query, _AUDIT_TABLES, {"peer_id"})
    if audits is not None:
        name, columns = audits
        verdict = _pick(columns, ("verdict", "result", "status", "outcome"))
        if verdict is not None:
            for peer, value, count in query(
                f"SELECT peer_id, LOWER({verdict}), COUNT(*) FROM {name} {only} GROUP BY peer_id, LOWER({verdict})",
                args,
            ):
                account = result.setdefault(peer, Account())
                if value in _PASSED:
                    account.audits_passed += count
                elif value in _FAILED:
                    account.audits_failed += count
                else:
                    account.audits_pending += count
    for peer in banned_peers(query, peer_id):
        result.setdefault(peer, Account()).banned = True
    return result


def banned_peers(query, peer_id: str | None = None) -> set[str]:
    """The banned peers (with ``peer_id``: that peer, if banned)."""
    only, args = (" AND peer_id=?", (peer_id,)) if peer_id is not None else ("", ())
    bans = _first_table(query, _BAN_TABLES, {"peer_id"})
    banned = {row[0] for row in query(f"SELECT peer_id FROM {bans[0]} WHERE 1{only}", args)} if bans else set()
    for table in ("peers", "standing"):  # standing: coordinator/books/credit.py's strikes and bans
        if "banned" in _columns(query, table):
            banned |= {row[0] for row in query(f"SELECT peer_id FROM {table} WHERE banned{only}", args)}
    return banned


def _recent(query, names: tuple[str, ...], limit: int) -> list[dict]:
    found = _first_table(query, names, {"peer_id"})
    if found is None:
        return []
    name, columns = found
    order = _pick(columns, _TIME_COLUMNS) or "rowid"
    rows = query(f"SELECT * FROM {name} ORDER BY {order} DESC LIMIT ?", (limit,))
    return [{key: (value if not isinstance(value, bytes) else value.hex()) for key, value in dict(row).items()}
            for row in rows]


def recent_audits(query, limit: int = 20) -> list[dict]:
    return _recent(query, _AUDIT_TABLES, limit)


def recent_bans(query, limit: int = 20) -> list[dict]:
    if {"peer_id", "banned", "reason", "at"} <= _columns(query, "standing"):
        return [dict(row) for row in query("SELECT peer_id, reason, strikes, at FROM standing WHERE banned "
                                           "ORDER BY at DESC LIMIT ?", (limit,))]
    return _recent(query, _BAN_TABLES, limit)
