"""One error type for mistakes a user can fix: the CLIs print its message on one line and exit 2."""


class UserError(Exception):
    """Bad input or an unusable environment, with a message that says what to do."""
