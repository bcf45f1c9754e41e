"""Where a peer's logs go: hivemind's, gRPC's and Python's own to a file in the data dir, ours to the terminal.

A volunteer's terminal shows what they should know or act on: the progress lines, one ``error:``
line, and potluck's own warnings. hivemind logs (and tracebacks) normal events of a swarm at
WARNING and ERROR: "could not find a group", a GeneratorExit when a round is abandoned, "Task was
destroyed but it is pending!" at exit. Those go to ``peer.log`` in the data dir, with the
exceptions Python would otherwise print itself (unraisable ones, those of background threads).
``-v`` shows everything on the terminal as well.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path

LOG_FILE = "peer.log"
LOG_BYTES, LOG_BACKUPS = 5_000_000, 2  # a long run keeps at most ~15 MB of logs
OUR_LOGGERS = "potluck"  # logging.getLogger("potluck.*"): potluck's own warnings reach the terminal

log = logging.getLogger("potluck.logs")


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == OUR_LOGGERS or record.name.startswith(OUR_LOGGERS + ".")


def quiet_grpc(verbose: bool) -> None:
    """gRPC's C core writes to the terminal itself: keep it to errors with -v, silent without
    (must run before grpc is imported)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if verbose else "NONE")


def route_logs(data_dir: Path, verbose: bool) -> Path:
    """Send every log record to ``data_dir/peer.log``; the terminal gets potluck's warnings (-v: all)."""
    from hivemind.utils.logging import use_hivemind_log_handler

    path = Path(data_dir) / LOG_FILE
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    if verbose:
        to_terminal.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    else:
        to_terminal.setFormatter(logging.Formatter("warning: %(message)s"))
        to_terminal.setLevel(logging.WARNING)
        to_terminal.addFilter(_Ours())
    use_hivemind_log_handler("nowhere")  # hivemind's records propagate to the root logger, not its own stderr
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    if not verbose:
        sys.unraisablehook = _log_unraisable
        threading.excepthook = _log_thread_exception
    return path


def _log_unraisable(unraisable) -> None:
    """e.g. a GeneratorExit ignored in a hivemind coroutine at shutdown: the file, not the terminal."""
    exc = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
    logging.getLogger("unraisable").warning("%s: %r", unraisable.err_msg or "Exception ignored in",
                                            unraisable.object, exc_info=exc)


def _log_thread_exception(args) -> None:
    exc = (args.exc_type, args.exc_value, args.exc_traceback)
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("thread").error("exception in thread %s", name, exc_info=exc)
