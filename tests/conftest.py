"""Shared test machinery: real OS processes on 127.0.0.1, cleaned up by PID after every test.

Every process a test starts gets its own session (process group), so its hivemind children and
p2p daemons are ended with it. Waiting is always polling against a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DIGITS_RUN = ROOT / "examples" / "digits" / "run.toml"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll predicate until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def descendants_of(pid: int) -> list[int]:
    """The pids of every live descendant of ``pid`` (empty where there is none)."""
    from benchmarks.procs import process_tree

    return [found for found in process_tree(pid) if found != pid]


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=ROOT, env={**os.environ, **(env or {})},
        )
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group (the process and the hivemind children it started), and every
        descendant in another group (serve starts its auditor and observer in sessions of their own):
        one that outlived the test would take CPU from every later test."""
        descendants = descendants_of(self.pid)
        self.signal_group(signal.SIGKILL)
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args[:2]} did not exit within {timeout:.0f}s; log:\n{self.log()[-3000:]}")


# Two tiers. The full tier (what `.ci/run` and the README's test command run) is everything. The fast
# tier, for the inner loop, leaves out every test that starts a swarm or a server (marked `swarm` here)
# and the few others marked `slow` in their files: `bash tests/run.sh --fast` (~2.5 minutes on 2 cores).
PROCESS_FIXTURES = {"procs", "coordinator", "swarm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("swarm"):
            item.add_marker(pytest.mark.swarm)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a console script of this package (coordinator, peer) and capture its output."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_run(path: Path, **values) -> Path:
    """A copy of the digits run.toml with some `key = value` lines replaced."""
    lines = []
    for line in DIGITS_RUN.read_text().splitlines():
        key = line.split("=")[0].strip()
        if key in values:
            value = values[key]
            line = f"{key} = {json.dumps(value) if isinstance(value, str) else value}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


FINGERPRINTS: dict[str, str] = {}  # coordinator address -> TLS fingerprint, so start_peer can pin it


@dataclass
class Coordinator:
    proc: Proc
    data_dir: Path
    address: str
    token: str
    fingerprint: str
    dashboard: str  # the dashboard's URL, e.g. http://127.0.0.1:PORT/

    def status(self) -> dict:
        result = cli("coordinator", "status", "--data-dir", str(self.data_dir), "--format", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def issue_token(self, org: str, *extra: str) -> str:
        """Add `org` (if new) and issue it a token (single-use unless extra says otherwise)."""
        if not any(o["name"] == org for o in self.orgs()):
            result = cli("coordinator", "org", "add", org, "--data-dir", str(self.data_dir))
            assert result.returncode == 0, result.stderr
        result = cli("coordinator", "token", "issue", "--org", org, "--data-dir", str(self.data_dir),
                     "--format", "json", *extra)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["token"]

    def orgs(self) -> list[dict]:
        result = cli("coordinator", "org", "list", "--data-dir", str(self.data_dir), "--format", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def start_coordinator(procs: list, data_dir: Path, run: Path, port: int = 0, name: str = "coordinator",
                      insecure: bool = False, extra: tuple[str, ...] = ()) -> Coordinator:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc(
        [str(BIN / "coordinator"), "serve", "--run", str(run), "--data-dir", str(data_dir), "--port", str(port),
         "--dashboard-port", "0", *(["--insecure"] if insecure else []), *extra],
        data_dir.parent / f"{name}.log",
    )
    procs.append(proc)

    def ready():
        if proc.popen.poll() is not None:
            raise AssertionError(f"coordinator exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            info = json.loads((data_dir / "coordinator.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info if info["pid"] == proc.pid else None

    info = wait_until(ready, 60, "the coordinator to write coordinator.json")
    token = (data_dir / "default-org.token").read_text().strip()
    if info["tls_fingerprint"]:
        FINGERPRINTS[info["address"]] = info["tls_fingerprint"]
    return Coordinator(proc, data_dir, info["address"], token, info["tls_fingerprint"], info["dashboard"])


def pin(address: str) -> list[str]:
    """The --fingerprint arguments for a peer joining the test coordinator at `address`."""
    return ["--fingerprint", FINGERPRINTS[address]] if address in FINGERPRINTS else ["--insecure"]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """One coordinator on the digits run, shared by the tests that only talk to it."""
    base = tmp_path_factory.mktemp("shared")
    started: list = []
    try:
        yield start_coordinator(started, base / "c", write_run(base / "run.toml"))
    finally:
        for proc in started:
            proc.kill()


def start_peer(procs: list, address: str, token: str, data_dir: Path, *extra: str, name: str | None = None) -> Proc:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc(
        [str(BIN / "peer"), "join", address, "--token", token, *pin(address), "--data-dir", str(data_dir),
         "--threads", "1", "--progress", "plain", *extra],
        data_dir.parent / f"{name or data_dir.name}.log",
    )
    procs.append(proc)
    return proc


def events(data_dir: Path) -> list[dict]:
    from peer.events import read_events

    return read_events(data_dir)


def epochs_reported(data_dir: Path) -> list[int]:
    return [event["epoch"] for event in events(data_dir) if event["event"] == "epoch"]


def load_model(data_dir: Path) -> dict:
    import torch

    return torch.load(data_dir / "model.pt", weights_only=True)
