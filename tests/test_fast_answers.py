"""Argument and address errors answer at once (issue 14): the real CLIs, checked without a stopwatch.

A wall-clock bound fails on a loaded machine, so each case asserts what makes the answer fast:
torch, hivemind and gRPC (seconds to import) are never imported on the error's path, read from
`python -X importtime`, and the process used under 1 s of CPU. Each answer is one `error:` line and
leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DIGITS_RUN, ROOT

HEAVY = {"torch", "hivemind", "grpc"}
FINGERPRINT = "ab" * 32


def answer(program: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str], float]:
    """Run `program` (peer or coordinator) under -X importtime: its result (stderr without the import
    lines), the top-level packages it imported, and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", f"from {program}.cli import main; main()",
                             *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    lines = result.stderr.splitlines()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    stderr = "".join(line + "\n" for line in lines if not line.startswith("import time:"))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr), imported, cpu


def assert_fast_error(program: str, *args: str, says: tuple[str, ...]) -> str:
    result, imported, cpu = answer(program, *args)
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error: ' line, got:\n{result.stderr}"
    for fragment in says:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    assert not imported & HEAVY, f"{sorted(imported & HEAVY)} imported on the path of: {lines[0]}"
    assert cpu < 1.0, f"{cpu:.2f} s of CPU for: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["nocolon", "--token", "t", "--insecure"], ("HOST:PORT",)),
    (["127.0.0.1:abc", "--token", "t", "--insecure"], ("HOST:PORT",)),
    (["127.0.0.1:70000", "--token", "t", "--insecure"], ("65535",)),
    ([":7450", "--token", "t", "--insecure"], ("HOST:PORT",)),
    (["127.0.0.1:7450", "--token", "t"], ("missing --fingerprint",)),
    (["127.0.0.1:7450", "--token", "t", "--fingerprint", "zz"], ("--fingerprint must", "'zz'")),
    (["127.0.0.1:7450", "--token", "t", "--fingerprint", FINGERPRINT, "--insecure"], ("contradict",)),
    (["127.0.0.1:7450", "--token", " ", "--insecure"], ("--token is empty",)),
])
def test_peer_join_argument_errors_answer_at_once(tmp_path, args, says):
    data_dir = tmp_path / "peer"
    assert_fast_error("peer", "join", *args, "--data-dir", str(data_dir), says=says)
    assert not data_dir.exists()


def test_peer_join_without_a_token_answers_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv("POTLUCK_TOKEN", raising=False)
    result, imported, cpu = answer("peer", "join", "127.0.0.1:7450", "--insecure", "--data-dir", str(tmp_path / "p"))
    assert result.returncode == 2 and "Missing option '--token'" in result.stderr, result.stderr
    assert not imported & HEAVY and cpu < 1.0, (sorted(imported & HEAVY), cpu)


def serve(data_dir: Path, *args: str, says: tuple[str, ...]) -> str:
    return assert_fast_error("coordinator", "serve", "--run", str(DIGITS_RUN), "--data-dir", str(data_dir),
                             "--port", "0", "--dht-port", "0", "--dashboard-port", "0", *args, says=says)


@pytest.mark.parametrize("args, says", [
    (["--host", "localhost"], ("--host 'localhost'", "IPv4")),
    (["--host", "999.1.1.1"], ("--host",)),
    (["--insecure", "--cert", "c.pem", "--key", "k.pem"], ("contradict",)),
    (["--cert", "missing.pem", "--key", "missing.key"], ("--cert missing.pem does not exist",)),
])
def test_serve_argument_errors_answer_at_once(tmp_path, args, says):
    serve(tmp_path / "c", *args, says=says)
    assert not (tmp_path / "c").exists()


def test_serve_missing_run_file_answers_at_once(tmp_path):
    assert_fast_error("coordinator", "serve", "--run", str(tmp_path / "MISSING.toml"), "--data-dir",
                      str(tmp_path / "c"), says=("MISSING.toml", "does not exist"))


@pytest.mark.parametrize("option", ["--port", "--dht-port", "--dashboard-port"])
def test_a_port_in_use_is_one_line_naming_it(tmp_path, option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve(tmp_path / "c", option, str(port), says=(f"port {port}", "in use", option))
    assert "add_port" not in line
    assert not (tmp_path / "c").exists()


def test_a_data_dir_in_use_answers_at_once(tmp_path):
    data_dir = tmp_path / "c"
    data_dir.mkdir()
    with open(data_dir / "serve.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a serving coordinator holds
        serve(data_dir, says=("already serving",))


@pytest.mark.parametrize("command", [["token", "issue", "--org", "x"], ["token", "list"], ["status"], ["ledger"],
                                     ["ledger", "verify"], ["org", "list"], ["org", "add", "x"], ["report", "--org", "x"]])
def test_coordinator_commands_without_a_ledger_answer_at_once(tmp_path, command):
    assert_fast_error("coordinator", *command, "--data-dir", str(tmp_path / "none"), says=("no coordinator ledger",))
    assert not (tmp_path / "none").exists()
