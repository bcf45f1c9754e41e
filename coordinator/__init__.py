"""potluck coordinator: admission, progress, the credit ledger, and the operator CLI."""

import peer  # noqa: E402,F401  (peer/__init__.py sets the tensor-sharing strategy before hivemind loads)
