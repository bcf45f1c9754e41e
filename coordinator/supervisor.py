"""serve's child processes (auditor, observer) have one owner, and none outlives it.

A `kill -9` of serve runs no teardown, so the children must notice on their own. The parent side
(Supervisor) starts every child in one place and stops them in one place: SIGTERM, then SIGKILL
after each child's grace. The child side (die_with_parent, called first thing in a child's main)
asks Linux to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG), and a thread checks the
parent's pid as a fallback where no such signal exists (and hard-exits a child whose graceful stop
hangs). SIGKILL, not SIGTERM: an auditor stuck in C code that holds the GIL (torch's shared-memory
manager handshake, spinning) never ran its SIGTERM handler nor that thread, and outlived serve at
100% CPU. Nothing is lost by it: the ledger is a transactional store. Forks of either side (hivemind's DHT processes) get SIGKILL when their parent dies
(their p2p daemons then exit on their own), so the whole tree goes with serve.

Caveats: the death signal follows the *thread* that started the child, so children are started
from serve's main thread; it is Linux-only, elsewhere the pid check alone acts (within
PARENT_POLL_SECONDS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PARENT_ENV = "POTLUCK_PARENT_PID"  # set by Supervisor.start: the pid the child must outlive no more
PARENT_POLL_SECONDS = 0.5  # how often a child checks its parent's pid (the fallback to the death signal)
HARD_EXIT_GRACE = 10.0  # seconds a child whose parent died may take to stop cleanly before it exits anyway
LOCK_RETRY_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) if sys.platform == "linux" else None


def set_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `signum` to this process when its parent thread dies; False off Linux."""
    if _libc is None:
        return False
    return _libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


_fork_parent = [0]


def _record_forker() -> None:
    _fork_parent[0] = os.getpid()


def _die_with_forker() -> None:
    # a fork inherits its parent's Python signal handlers (serve's and the auditor's only set a stop event
    # the fork never reads): SIGTERM gets its default back, and the death signal is SIGKILL
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: leave it
        pass
    set_death_signal(signal.SIGKILL)
    if os.getppid() != _fork_parent[0]:  # the forker died before the signal was asked for
        os._exit(1)


_fork_hook_installed = False


def forks_die_with_this_process() -> None:
    """Every process this one forks from now on (hivemind's DHT) dies with it. Idempotent."""
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(before=_record_forker, after_in_child=_die_with_forker)
        _fork_hook_installed = True


def die_with_parent() -> None:
    """In a child started by Supervisor: end this process when the parent dies. No-op when run by hand."""
    value = os.environ.pop(PARENT_ENV, None)  # popped: this process's own children have it as their parent
    if not value:
        return
    parent = int(value)
    set_death_signal(signal.SIGKILL)
    forks_die_with_this_process()
    if os.getppid() != parent:  # the parent died before the death signal was asked for
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)  # the fallback to the death signal; a second SIGTERM is harmless
    time.sleep(HARD_EXIT_GRACE)
    os._exit(1)


def hold_exclusive_lock(path: Path, what: str, stop: threading.Event | None = None):
    """Wait until this process alone holds `path` (until it exits), then write its pid there.

    A POSIX record lock: the OS drops it when the process dies (kill -9 included), and forked
    children do not share it. Returns the open file (keep it: closing it releases the lock), or None
    when `stop` was set while waiting.
    """
    handle = open(path, "a+")
    stop = stop or threading.Event()
    said = False
    while True:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if not said:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                print(f"waiting for the previous {what} (pid {holder}) to exit", flush=True)
                said = True
            if stop.wait(LOCK_RETRY_SECONDS):
                handle.close()
                return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen
    grace: float


class Supervisor:
    """Starts serve's children and stops them all, once, however serve's start or run ends."""

    def __init__(self):
        self._children: list[_Child] = []
        forks_die_with_this_process()

    def start(self, name: str, args: list[str], grace: float, log_path: Path | None = None) -> subprocess.Popen:
        """Start a child (from the main thread: see the module's caveats); its output to log_path if given."""
        log = open(log_path, "ab") if log_path is not None else None
        try:
            # a session of its own: the terminal's Ctrl-C reaches serve alone, which stops its children in order
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT if log is not None else None,
                                     env={**os.environ, PARENT_ENV: str(os.getpid())}, start_new_session=True)
        finally:
            if log is not None:
                log.close()  # the child has its own copy
        self._children.append(_Child(name, popen, grace))
        return popen

    def pids(self) -> dict[str, int]:
        return {child.name: child.popen.pid for child in self._children}

    def stop(self) -> None:
        """SIGTERM every child at once, then wait for each up to its grace, then SIGKILL."""
        children, self._children = self._children, []
        for child in reversed(children):
            if child.popen.poll() is None:
                child.popen.terminate()
        start = time.monotonic()
        for child in children:
            try:
                child.popen.wait(timeout=max(0.0, start + child.grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
