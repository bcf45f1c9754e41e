"""serve's children cannot be orphaned (coordinator/supervisor.py), checked on real processes by PID.

The serve tests start a real coordinator (about 15-40 s each on a loaded 2-core box): a kill -9 of
serve must take its whole process tree with it, a restart must run exactly one auditor, and
SIGTERM or Ctrl-C must end serve cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import DIGITS_RUN, ROOT, start_coordinator, wait_until

from benchmarks.procs import proc_stat as _stat


def _alive(pid: int, started: str) -> bool:
    """The same process (same start time: pids are reused) exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and fields[19] == started


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, as pid -> start time."""
    parents: dict[int, int] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and fields[0] != "Z":
            parents[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = started[pid]
                frontier.append(pid)
    return found


def auditors_of(data_dir: Path) -> list[int]:
    """Live auditor processes working on the ledger in data_dir (not their hivemind forks, which share
    the command line but have an auditor as parent)."""
    marker, where = b"coordinator.auditor", str(data_dir.resolve()).encode()
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = _stat(int(entry.name)) if marker in args and where in args else None
        if fields is not None and fields[0] != "Z":
            found[int(entry.name)] = int(fields[1])
    return sorted(pid for pid, parent in found.items() if parent not in found)


def lock_holder(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "auditor.lock").read_text().strip() or 0) or None
    except FileNotFoundError:
        return None


def auditor_serving(coordinator) -> int:
    """Wait until serve's auditor holds the ledger's auditor lock; its pid."""
    info = json.loads((coordinator.data_dir / "coordinator.json").read_text())
    pid = info["children"]["auditor"]
    wait_until(lambda: lock_holder(coordinator.data_dir) == pid, 120, "the auditor to hold auditor.lock")
    return pid


def assert_all_gone(tree: dict[int, str], timeout: float = 45) -> None:
    wait_until(lambda: not [pid for pid, started in tree.items() if _alive(pid, started)], timeout,
               f"every process of the killed serve's tree to exit: {tree}")


def test_kill_9_of_serve_leaves_no_process_and_a_restart_runs_one_auditor(tmp_path, procs):
    data_dir = tmp_path / "c"
    first = start_coordinator(procs, data_dir, DIGITS_RUN, name="first")
    old_auditor = auditor_serving(first)
    tree = descendants(first.proc.pid)
    info = json.loads((data_dir / "coordinator.json").read_text())
    assert set(info["children"]) == {"auditor", "observer"}
    assert set(info["children"].values()) <= set(tree), (info, tree)
    os.kill(first.proc.pid, signal.SIGKILL)  # serve alone: no teardown runs
    first.proc.popen.wait(timeout=10)
    assert_all_gone(tree)

    written_before = (data_dir / "auditor.log").stat().st_size  # the log is appended to across restarts
    second = start_coordinator(procs, data_dir, DIGITS_RUN, name="second")
    new_auditor = auditor_serving(second)
    assert new_auditor != old_auditor
    assert auditors_of(data_dir) == [new_auditor]

    tree = descendants(second.proc.pid)
    second.proc.popen.send_signal(signal.SIGTERM)
    assert second.proc.wait(60) == 0
    log = second.proc.log() + (data_dir / "auditor.log").read_text()[written_before:]
    assert "Traceback" not in log, log[-3000:]
    assert "coordinator stopping" in second.proc.log()
    assert_all_gone(tree, timeout=10)  # a clean stop waits for its children


def test_ctrl_c_of_serve_exits_cleanly(tmp_path, procs):
    coordinator = start_coordinator(procs, tmp_path / "c", DIGITS_RUN, extra=("--no-dashboard",))
    # no wait for the children to be ready: a stop while they start must be as clean
    tree = descendants(coordinator.proc.pid)
    coordinator.proc.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    assert coordinator.proc.wait(60) == 0
    log = coordinator.proc.log() + (coordinator.data_dir / "auditor.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert_all_gone(tree, timeout=10)


HOLDER = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from coordinator.supervisor import hold_exclusive_lock
    lock = hold_exclusive_lock(Path(sys.argv[1]), "auditor")
    print("held", flush=True)
    threading.Event().wait()
""")


@pytest.mark.timeout(60)
def test_a_second_auditor_waits_until_the_first_is_gone(tmp_path):
    """The ledger's auditor lock: a second holder waits, names the first, and takes over when it dies."""
    path = tmp_path / "auditor.lock"

    def holder() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)

    first, second = holder(), None
    try:
        assert first.stdout.readline().strip() == "held"
        assert path.read_text().strip() == str(first.pid)
        second = holder()
        assert second.stdout.readline().strip() == f"waiting for the previous auditor (pid {first.pid}) to exit"
        assert path.read_text().strip() == str(first.pid)  # the waiter did not take it
        first.kill()
        assert second.stdout.readline().strip() == "held"
        assert path.read_text().strip() == str(second.pid)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()


# --- the supervisor's parts on small real processes (no torch, a few seconds) ----------------------

CHILD = textwrap.dedent("""
    import multiprocessing, os, signal, sys, threading
    from coordinator.supervisor import die_with_parent
    die_with_parent()
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child whose clean stop hangs
    fork = multiprocessing.get_context("fork").Process(target=threading.Event().wait, daemon=True)
    fork.start()  # stands for hivemind's DHT process
    print(os.getpid(), fork.pid, flush=True)
    if sys.argv[1] == "stuck":  # the auditor seen spinning in torch's shm-manager handshake: C code
        import ctypes           # that holds the GIL, so neither a Python SIGTERM handler nor a thread runs
        signal.signal(signal.SIGTERM, lambda *_: None)
        libc, mutex = ctypes.PyDLL(None), ctypes.create_string_buffer(64)  # PyDLL: the GIL stays held
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # a normal mutex locked twice: blocked for good, signals or not
    threading.Event().wait()
""")

PARENT = textwrap.dedent("""
    import sys, threading
    from coordinator.supervisor import Supervisor
    supervisor = Supervisor()
    supervisor.start("child", [sys.executable, "-c", sys.argv[1], sys.argv[2]], grace=1.0)
    threading.Event().wait()
""")


def _tree_of_a_supervised_child(mode: str) -> tuple[subprocess.Popen, dict[int, str]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mode], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2, pids
    return parent, {pid: _stat(pid)[19] for pid in pids}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["plain", "stubborn", "stuck"])  # each dies at once: all in the fast tier
def test_a_supervised_child_and_its_forks_die_with_a_killed_parent(mode):
    """The death signal (SIGKILL) ends the child at once, whether it ignores SIGTERM or is stuck in C
    code holding the GIL; its fork (SIGKILL on its forker's death) goes too."""
    parent, tree = _tree_of_a_supervised_child(mode)
    try:
        assert all(_alive(pid, started) for pid, started in tree.items())
        parent.kill()  # kill -9: no teardown runs
        parent.wait()
        assert_all_gone(tree, timeout=40)
    finally:
        for pid, started in tree.items():
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_stop_kills_a_child_that_ignores_sigterm_after_its_grace(tmp_path):
    from coordinator.supervisor import Supervisor

    ready = tmp_path / "ready"
    supervisor = Supervisor()
    child = supervisor.start("stubborn", [sys.executable, "-c", "import pathlib, signal, sys, time; "
                                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                          "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)", str(ready)], grace=1.0)
    wait_until(ready.exists, 30, "the child to ignore SIGTERM")
    supervisor.stop()
    assert child.returncode == -signal.SIGKILL
    supervisor.stop()  # a second stop (two exits of one ExitStack path) is harmless
