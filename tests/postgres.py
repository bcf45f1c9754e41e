"""A real PostgreSQL server for the tests: initdb and pg_ctl in a temporary folder, on 127.0.0.1 and a free port.

One server per test session (``postgres_server``), one fresh database per test (``postgres_url``). The
binaries come from PATH or Debian's /usr/lib/postgresql/*/bin (.ci/run installs them); without any, the
tests that need a server skip, saying so. initdb refuses to run as root: as root the server runs as the
system user ``potluck-pg`` (created when missing). The server itself is benchmarks/postgres_server.py
(the capacity benchmark starts one too); here it runs with ``fsync=off``: the tests check what the books
do, not the disk.
"""

from __future__ import annotations

import pytest

from benchmarks.postgres_server import Server, binaries


@pytest.fixture(scope="session")
def postgres_server():
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                    "install Debian's postgresql package (.ci/run does)")
    server = Server(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    return postgres_server.create_database()
