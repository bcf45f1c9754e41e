"""The console scripts as a user meets them: help, and one clear line for every mistake."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess

import pytest

from conftest import BIN, DIGITS_RUN, cli, pin, start_coordinator, write_run


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """A non-zero exit with exactly one 'error: ...' line on stderr, no traceback; returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{output}"
    assert "Traceback" not in output, f"a traceback reached the user:\n{output}"
    lines = result.stderr.rstrip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error: ' line on stderr, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join(address: str, token: str, data_dir, *extra: str) -> subprocess.CompletedProcess:
    return cli("peer", "join", address, "--token", token, *pin(address), "--data-dir", str(data_dir),
               "--connect-timeout", "5", "--threads", "1", "--progress", "plain", *extra)


# --- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["coordinator", "peer"])
def test_version(program):
    for flag in ("--version", "-V"):
        result = cli(program, flag)
        assert result.returncode == 0 and result.stdout.strip() == f"potluck {program} 0.1.0", result

@pytest.mark.parametrize("command", [
    ("coordinator",),
    ("coordinator", "serve"),
    ("coordinator", "token"),
    ("coordinator", "token", "issue"),
    ("coordinator", "token", "list"),
    ("coordinator", "token", "revoke"),
    ("coordinator", "org"),
    ("coordinator", "org", "add"),
    ("coordinator", "org", "list"),
    ("coordinator", "org", "remove"),
    ("coordinator", "status"),
    ("coordinator", "export"),
    ("coordinator", "report"),
    ("peer",),
    ("peer", "join"),
    ("peer", "id"),
    ("peer", "status"),
    ("peer", "leave"),
], ids=" ".join)
def test_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# --- serve: bad run files ------------------------------------------------------------------------

def serve(run, data_dir) -> subprocess.CompletedProcess:
    return cli("coordinator", "serve", "--run", str(run), "--data-dir", str(data_dir), "--port", "0", timeout=30)


def test_serve_missing_run_file(tmp_path):
    missing = tmp_path / "MISSING.toml"
    assert_user_error(serve(missing, tmp_path / "c"), "MISSING.toml", "does not exist")


def test_serve_malformed_toml(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text("[run\nid = 'x'\n")
    assert_user_error(serve(run, tmp_path / "c"), "not valid TOML")


def test_serve_missing_required_key(tmp_path):
    run = tmp_path / "run.toml"
    lines = DIGITS_RUN.read_text().splitlines()
    run.write_text("\n".join(line for line in lines if not line.startswith("seed")) + "\n")
    assert_user_error(serve(run, tmp_path / "c"), "missing [run] seed")


def test_serve_wrong_type(tmp_path):
    run = write_run(tmp_path / "run.toml", seed="abc")
    assert_user_error(serve(run, tmp_path / "c"), "[run] seed", "'abc'")


# --- join: unreachable, refused, unusable run ----------------------------------------------------

@pytest.mark.slow
def test_join_unreachable_address(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    result = cli("peer", "join", address, "--token", "x", "--fingerprint", "0" * 64, "--data-dir", str(tmp_path / "p"),
                 "--connect-timeout", "2")
    assert_user_error(result, "cannot reach", address)


@pytest.mark.parametrize("token", ["plk1.e30.AAAA", "hello"])
def test_join_unknown_token(coordinator, tmp_path, token):
    result = join(coordinator.address, token, tmp_path / "p")
    assert_user_error(result, "unknown join token")
    assert coordinator.proc.popen.poll() is None, "a refused join took the coordinator down"
    assert coordinator.status()["peers"] == [], "a refused join changed the ledger"


@pytest.mark.parametrize("values, fragments", [
    ({"name": "potluck_no_such_task"}, ("potluck_no_such_task", "not installed")),
    ({"version": "999"}, ("version", "999")),
], ids=["missing-task", "wrong-version"])
def test_join_task_unusable(procs, tmp_path, values, fragments):
    c = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml", **values))
    result = join(c.address, c.token, tmp_path / "p")
    assert_user_error(result, *fragments)
    assert c.proc.popen.poll() is None, "the coordinator died"


# --- operator commands on a data dir without a ledger --------------------------------------------

@pytest.mark.parametrize("command", [
    ("coordinator", "status"),
    ("coordinator", "token", "issue", "--org", "x"),
], ids=["status", "token-issue"])
def test_no_ledger(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli(*command, "--data-dir", str(empty)), "no coordinator ledger")
    assert list(empty.iterdir()) == [], "a failed command left files behind"


def test_org_add_bad_name(coordinator):
    before = coordinator.orgs()
    result = cli("coordinator", "org", "add", "bad/name", "--data-dir", str(coordinator.data_dir))
    assert_user_error(result, "invalid org name")
    assert coordinator.orgs() == before


@pytest.mark.parametrize("args, fragments", [
    (("--org", "nobody"), ("unknown org", "org add nobody")),
    (("--org", "Zeta Lab"), ("unknown org", "coordinator org add 'Zeta Lab'")),  # pasteable as printed
    (("--org", "default", "--expires", "soon"), ("--expires", "'soon'")),
    (("--org", "default", "--max-peers", "-1"), ("--max-peers",)),
], ids=["unknown-org", "unknown-org-with-space", "bad-expiry", "negative-max-peers"])
def test_token_issue_refused(coordinator, args, fragments):
    before = cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir), "--format", "json").stdout
    result = cli("coordinator", "token", "issue", *args, "--data-dir", str(coordinator.data_dir))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output
    after = cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir), "--format", "json").stdout
    assert after == before, "a refused token issue changed the ledger"


def test_token_issue_json(coordinator):
    assert cli("coordinator", "org", "add", "Partner Lab", "--data-dir", str(coordinator.data_dir)).returncode == 0
    result = cli("coordinator", "token", "issue", "--org", "Partner Lab", "--data-dir", str(coordinator.data_dir),
                 "--format", "json", "--expires", "2h", "--max-peers", "3")
    assert result.returncode == 0, result.stderr
    issued = json.loads(result.stdout)
    assert {"id", "token", "org", "expires", "max_peers", "join_command"} <= set(issued)
    assert issued["org"] == "Partner Lab" and issued["max_peers"] == 3
    assert issued["token"].startswith("plk1.")
    assert coordinator.address in issued["join_command"]
    assert issued["token"] in issued["join_command"]
    assert f"--fingerprint {coordinator.fingerprint}" in issued["join_command"]
    listed = json.loads(cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir),
                            "--format", "json").stdout)
    row = next(t for t in listed if t["id"] == issued["id"])
    assert row["org"] == "Partner Lab" and row["revoked"] is False and row["expires"] == issued["expires"]


# --- peer id -------------------------------------------------------------------------------------

def test_peer_id_is_stable_and_key_private(tmp_path):
    data_dir = tmp_path / "peer"
    first = cli("peer", "id", "--data-dir", str(data_dir))
    second = cli("peer", "id", "--data-dir", str(data_dir))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert re.fullmatch(r"p-[0-9a-f]{16}\n", first.stdout), first.stdout
    assert first.stdout == second.stdout
    mode = stat.S_IMODE((data_dir / "identity.key").stat().st_mode)
    assert mode == 0o600, oct(mode)
    other = cli("peer", "id", "--data-dir", str(tmp_path / "other"))
    assert other.stdout != first.stdout, "two data dirs got the same identity"


def test_token_list_shows_whole_ids_at_80_columns(coordinator):
    """`token revoke` needs the whole id: the table never cuts it, whatever the width."""
    org = "The Northern Universities Consortium for Volunteer Computing"
    assert cli("coordinator", "org", "add", org, "--data-dir", str(coordinator.data_dir)).returncode == 0
    assert cli("coordinator", "token", "issue", "--org", org, "--data-dir", str(coordinator.data_dir)).returncode == 0
    tokens = json.loads(cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir),
                            "--format", "json").stdout)
    table = subprocess.run([str(BIN / "coordinator"), "token", "list", "--data-dir", str(coordinator.data_dir)],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert table.returncode == 0, table.stderr
    for token in tokens:
        assert token["id"] in table.stdout, table.stdout
