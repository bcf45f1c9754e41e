"""The processes a benchmark starts: each in its own session, logged to a file, ended by PID only.

Every process gets its own process group, so its hivemind children (averager, DHT, p2pd) end with
it. :meth:`Processes.close` is idempotent and runs from ``finally`` and from the signal handlers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

GRACE_SECONDS = 15.0
ROOT = Path(__file__).resolve().parents[1]


def child_env(extra: dict | None = None) -> dict:
    """The environment of a child: this checkout first on the path, so ``peer join`` finds the
    benchmark task (benchmarks.simtask) and this checkout's packages, installed or not."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant alive now (root first when it is alive)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if proc_stat(pid) is not None:
            tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


class Processes:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._started: list[subprocess.Popen] = []
        self._logs: list = []
        self.stopping = threading.Event()  # set by close(): every wait of the harness ends early

    def sleep(self, seconds: float) -> None:
        """Sleep, unless the run is being torn down (then raise, so a worker thread ends at once)."""
        if self.stopping.wait(max(seconds, 0)):
            raise RuntimeError("the benchmark is stopping")

    def wait_for(self, predicate, timeout: float, what: str, watch=(), interval: float = 0.2, with_log: bool = False):
        """Poll ``predicate`` until it is truthy (returned); raise when a watched process exits (its log's
        tail with ``with_log``), when ``timeout`` seconds pass, or when the run is torn down."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for popen in watch:
                if popen.poll() is not None:
                    tail = ":\n" + self.log(popen.name)[-3000:] if with_log else ""
                    raise RuntimeError(f"{popen.name} exited with {popen.returncode} while waiting for {what}{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.sleep(interval)

    def start(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        if self.stopping.is_set():
            raise RuntimeError("the benchmark is stopping")
        log = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log)
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=child_env(env), cwd=ROOT)
        popen.started_at = time.time()
        popen.name = name
        self._started.append(popen)
        return popen

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def signal_group(popen: subprocess.Popen, signum: int) -> None:
        try:
            os.killpg(popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, popens: list[subprocess.Popen], grace: float = GRACE_SECONDS) -> None:
        """SIGINT (a clean leave), then SIGKILL the whole group of whatever is still there after grace."""
        for popen in popens:
            if popen.poll() is None:
                self.signal_group(popen, signal.SIGINT)
        deadline = time.monotonic() + grace
        for popen in popens:
            try:
                popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            self.signal_group(popen, signal.SIGKILL)  # leftovers of the group (p2pd, averagers)
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Kill every group started here, at once (the cleanup path)."""
        self.stopping.set()
        for popen in self._started:
            self.signal_group(popen, signal.SIGKILL)
        for popen in self._started:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._started, self._logs = [], []

    def alive(self) -> list[int]:
        return [popen.pid for popen in self._started if popen.poll() is None]
