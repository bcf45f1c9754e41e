"""A throwaway PostgreSQL server: initdb and pg_ctl in a temporary folder, on 127.0.0.1 and a free port.

Shared by the tests (tests/postgres.py: one server per test session, fsync off) and the capacity
benchmark (its own server per measurement, fsync on: the figure is about durable reports). The
binaries come from PATH or Debian's /usr/lib/postgresql/*/bin. initdb refuses to run as root: as root
the server runs as the system user ``potluck-pg`` (created when missing). ``stop`` ends only this
server: ``pg_ctl stop`` on its own data folder, else a signal to the postmaster PID it wrote.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SERVER_USER = "potluck-pg"


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: PATH first, else the newest Debian install."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.access(Path(folder) / "initdb", os.X_OK):
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """The command prefix that runs the server's binaries as a non-root user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
                       check=True, capture_output=True)
    return ["runuser", "-u", SERVER_USER, "--"]


class Server:
    def __init__(self, bin_dir: Path, fsync: bool = False, max_connections: int = 200):
        self.bin, self.fsync, self.max_connections = bin_dir, fsync, max_connections
        self.prefix = _as_server_user()
        self.root = Path(tempfile.mkdtemp(prefix="potluck-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = None
        try:
            if self.prefix:
                shutil.chown(self.root, SERVER_USER)
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.prefix, str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
                               f"\n{self.log.read_text() if self.log.exists() else ''}")
        return result

    def start(self) -> "Server":
        for attempt in range(3):  # a free port can be taken between the probe and the server's bind
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                       f"-c fsync={'on' if self.fsync else 'off'} -c max_connections={self.max_connections}")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
                return self
            except RuntimeError:
                if attempt == 2:
                    raise
        return self

    def postmaster_pid(self) -> int | None:
        """The PID this server's postmaster wrote (first line of postmaster.pid), or None."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, PermissionError, ValueError):
            return None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"books_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop this server (fast shutdown; SIGQUIT to its postmaster if pg_ctl fails) and remove its folder."""
        try:
            pid = self.postmaster_pid()
            if pid is not None:
                try:
                    self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
                except (RuntimeError, subprocess.TimeoutExpired):
                    try:
                        os.kill(pid, signal.SIGQUIT)  # immediate shutdown; the postmaster ends its backends
                    except ProcessLookupError:
                        pass
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                        time.sleep(0.1)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
