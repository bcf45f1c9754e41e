"""potluck coordinator: admission, progress, the credit ledger, and the operator CLI."""
