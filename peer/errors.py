"""One error type for mistakes a user can fix: the CLIs print its message on one line and exit 2."""


class UserError(Exception):
    """Bad input or an unusable environment, with a message that says what to do."""


# How the coordinator words an eviction (revoked token, removed org, ban); the peer recognises it by this.
EVICTED_PREFIX = "evicted from the run: "
