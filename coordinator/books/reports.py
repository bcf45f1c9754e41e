"""A Report in one transaction: the session check, the raw report row, the credit row with its proof,
the cheap checks, the contribution-log entry and any ban they make due commit together or not at all.

Written once, the ledger's half could commit without the credit half (a crash or an error between two
transactions): the report was acknowledged as a duplicate on resend and never credited or audited.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.books.credit import Credit
from coordinator.books.ledger import Ledger


@dataclass(frozen=True)
class Recorded:
    fresh: bool  # False: this report id was already in the books (a resend)
    problems: list[str]  # the cheap checks it failed


def record(ledger: Ledger, credit: Credit, request, public_key: bytes, micro_batch_size: int) -> Recorded:
    """Record a signature-checked report in the books; raises LedgerError (and writes nothing) when the
    session is not valid or the report id or epoch was used for another report."""
    with ledger._write() as db:
        fresh = ledger._record_report(
            db, request.peer_id, request.session, request.report_id, request.epoch, request.samples,
            request.loss, request.compute_seconds, dict(request.metrics))
        # always: books written before this module may hold the raw row without the credit half
        admitted, bans = credit._record_report(db, request, public_key, micro_batch_size)
    credit._banned(bans)
    return Recorded(fresh, admitted.problems)
