"""potluck peer: the work a volunteer's machine does (task API, data assignment, training, CLI)."""

__version__ = "0.1.0"
