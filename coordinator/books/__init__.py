"""The coordinator's books: every table of the run and all of its SQL, in one package.

One schema with numbered migrations (schema.py) for the ledger file; the stores that write it
(ledger.py: admission and raw reports; credit.py: checks, audits, bans with their evictions,
settlement; binding.py: attestations; contribution_log.py: the hash chain; reports.py: a Report in one
transaction across them) and the read models every view shares (run_epoch.py: the run's epoch;
accounting.py: a peer's account; views.py: statements and charts).
Where they live: an embedded sqlite file or a PostgreSQL database (connection.py: what differs between
the two; postgres_schema.py: the same steps in PostgreSQL's types). Modules outside this package hold
no SQL: they call these.
"""
