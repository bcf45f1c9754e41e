"""What `coordinator serve` can refuse before it imports torch, hivemind or gRPC: in well under 1 s.

A bad run file, contradicting options, a host hivemind cannot listen on, a data dir another serve
holds, or a port already in use each get one `error:` line before anything slow starts (a port in
use used to cost a DHT start and a gRPC log line first). The bind probes are a courtesy, not a
guarantee: serve still handles a port taken in between.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
from pathlib import Path

from coordinator.serve_info import LOCK_FILE, read_info
from peer.errors import UserError
from peer.runconfig import RunConfig, load_run_config


def check_serve_args(run_path: Path, data_dir: Path, host: str, ports: dict[str, int], insecure: bool,
                     cert: Path | None, key: Path | None, store: str | None = None) -> RunConfig:
    """The run config, once every cheap check passed; ``ports`` maps an option (--port) to its value.
    A ``--store`` database is reached once here, before serve writes anything to the data dir."""
    if insecure and (cert or key):
        raise UserError("--insecure and --cert/--key contradict each other; pick one")
    if (cert is None) != (key is None):
        raise UserError("--cert and --key go together: pass both (PEM files) or neither")
    for option, path in (("--cert", cert), ("--key", key)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{option} {path} does not exist")
    config = load_run_config(run_path)
    check_host(host)
    if (Path(data_dir) / LOCK_FILE).exists():  # no lock file: no coordinator serves it (and nothing is created)
        lock_data_dir(data_dir).close()
    for option, port in ports.items():
        check_port_free(host, port, option)
    if store:
        from coordinator.books import connection

        connection.check_url(store)
        connection.connect(store).close()
    return config


def check_host(host: str) -> None:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise UserError(f"--host {host!r} must be an IPv4 address such as 127.0.0.1 or 0.0.0.0 "
                        f"(the swarm's DHT node listens on /ip4/HOST)") from None


def check_port_free(host: str, port: int, option: str) -> None:
    """Refuse a port something already listens on; 0 (pick a free one) always passes."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use ({option}); stop what listens there "
                                f"or pick another {option} (0 picks a free one)") from None
            raise UserError(f"cannot listen on {host}:{port} ({option}): {error.strerror}") from None


def lock_data_dir(data_dir: Path):
    """One coordinator per data dir; the OS drops the lock when the process dies, even by kill -9."""
    lock = open(Path(data_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        info = read_info(data_dir) or {}
        raise UserError(
            f"another coordinator (pid {info.get('pid', '?')}) is already serving {data_dir}; "
            f"stop it first or use another --data-dir"
        ) from None
    return lock
