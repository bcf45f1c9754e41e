"""The contribution log: append-only and hash-chained, so a partner can re-check the credit ledger.

Every report (its canonical bytes, signature and the peer's public key), audit verdict, strike, ban
and settlement is one entry. Entry n stores sha256(hash of entry n-1 + its own canonical content);
changing, removing or reordering any entry breaks the chain from there on. SQL triggers refuse
UPDATE and DELETE; a chain check still catches whoever edits the file with other tools.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time


GENESIS = "0" * 64


def entry_hash(prev_hash: str, seq: int, at: float, kind: str, peer_id: str, body: str) -> str:
    content = json.dumps([seq, repr(at), kind, peer_id, body], separators=(",", ":"))
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def append(db: sqlite3.Connection, kind: str, peer_id: str, body: dict) -> int:
    """Append one entry inside the caller's transaction; returns its sequence number."""
    last = db.execute("SELECT seq, hash FROM contribution_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    at = time.time()
    db.execute("INSERT INTO contribution_log VALUES (?, ?, ?, ?, ?, ?, ?)",
               (seq, at, kind, peer_id, text, prev, entry_hash(prev, seq, at, kind, peer_id, text)))
    return seq


def chain_problems(db: sqlite3.Connection) -> list[str]:
    """Every break in the chain, each naming the entry (empty when the log is intact)."""
    problems, prev, expected_seq = [], GENESIS, 1
    for seq, at, kind, peer_id, body, prev_hash, stored in db.execute(
        "SELECT seq, at, kind, peer_id, body, prev_hash, hash FROM contribution_log ORDER BY seq"
    ):
        if seq != expected_seq:
            problems.append(f"contribution_log: entry {expected_seq} is missing (next is {seq})")
        if prev_hash != prev:
            problems.append(f"contribution_log: entry {seq} ({kind}, {peer_id}) does not link to the entry before it")
        if entry_hash(prev_hash, seq, at, kind, peer_id, body) != stored:
            problems.append(f"contribution_log: entry {seq} ({kind}, {peer_id}) was altered (hash mismatch)")
        prev, expected_seq = stored, seq + 1
    return problems
