"""`coordinator serve`: the ledger, the swarm's bootstrap DHT node and the gRPC service in one process.

Start order matters: the hivemind DHT forks its own process, so it starts before any gRPC
machinery exists in this process (gRPC and fork do not mix). Its child processes (auditor,
observer) are owned by coordinator/supervisor.py and die with it; everything serve starts is
torn down in one place, an ExitStack, however the start or the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator import tls, tokens
from coordinator.auth import SignedRequestInterceptor
from coordinator.checkpoints import latest_checkpoint
from coordinator.dashboard import CachedState, Dashboard
from coordinator.books.connection import STORE_ENV
from coordinator.books.ledger import LEDGER_FILE, Ledger
from coordinator.metrics import Metrics
from coordinator.run_view import run_state
from coordinator.serve_checks import lock_data_dir
from coordinator.serve_info import INFO_FILE, KEY_FILE, LOCK_FILE, join_command, read_info  # noqa: F401 (re-exported)
from coordinator.service import CoordinatorService
from coordinator.supervisor import Supervisor, forks_die_with_this_process
from peer.errors import UserError
from peer.files import replace_file
from peer.identity import Identity, load_or_create_identity
from peer.runconfig import RunConfig, load_run_config
from peer.swarm import swarm_peer_id, use_fork_start_method
from peer.swarm_access import AccessFiles, issue_access_token, make_authorizer, rsa_public_key
from peer.transport import MAX_MESSAGE_BYTES  # the same limit both ways; legitimate messages are small
from protos import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("potluck.coordinator")

DHT_IDENTITY_FILE = "dht_identity.key"
AUDITOR_LOG = "auditor.log"
DEFAULT_TOKEN_FILE = "default-org.token"
DEFAULT_ORG = "default"
GRPC_WORKERS = 16
DEFAULT_TOKEN_TTL = 7 * 86400.0  # the default org's printed token; renewed on a start after it expired
ACCESS_REFRESH_SECONDS = 1.0  # how often the DHT node's lists are re-read from the ledger (Join also pushes them)
AUDITOR_GRACE = 10.0  # seconds the auditor may take to stop before it is killed
OBSERVER_GRACE = 15.0  # the observer may be saving a checkpoint


@dataclass
class Running:
    address: str
    dht_maddrs: list[str]
    join_command: str
    stop: threading.Event


def _write_info(data_dir: Path, info: dict) -> None:
    replace_file(Path(data_dir) / INFO_FILE, json.dumps(info, indent=2).encode())


def _default_token(ledger: Ledger, data_dir: Path, identity: Identity, config: RunConfig) -> str:
    """A join token for the 'default' org (any number of peers, 7 days), kept (mode 0600) for reprinting
    and replaced when it expired or was revoked."""
    path = Path(data_dir) / DEFAULT_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        try:
            claims = tokens.decode(token, identity.public_bytes, now=time.time() + 3600)
            if not any(row["id"] == claims.id and row["revoked"] for row in ledger.tokens()):
                return token
        except tokens.TokenError:
            pass
    if not any(org["name"] == DEFAULT_ORG and not org["removed"] for org in ledger.orgs()):
        ledger.add_org(DEFAULT_ORG)
    token, _ = tokens.issue(ledger, identity.private_key, config.run_id, DEFAULT_ORG, DEFAULT_TOKEN_TTL, 0)
    replace_file(path, (token + "\n").encode(), mode=0o600, durable=True)
    return token


class SwarmAccessKeeper:
    """Keeps the coordinator's own DHT node admitted: renews its access token and mirrors the ledger's
    lists into the files its forked DHT process reads (so an evicted peer is refused there too).
    Join calls refresh() before it replies, so a new admission is in effect at the bootstrap node
    by the time the peer dials it; the 1 s tick carries evictions and expiries."""

    def __init__(self, data_dir: Path, ledger: Ledger, identity: Identity, config: RunConfig):
        self.files = AccessFiles(data_dir)
        self._lock = threading.Lock()  # refresh() runs in the keeper's thread and in Join handlers
        self.ledger, self.identity, self.ttl = ledger, identity, config.access_token_ttl
        self.authorizer = make_authorizer(data_dir, identity.public_bytes)
        self.peer_id = swarm_peer_id(data_dir, DHT_IDENTITY_FILE)
        ledger.set_internal_swarm_ids([self.peer_id])
        self._renewed = 0.0
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        if time.time() - self._renewed > self.ttl / 2:
            token = issue_access_token(self.identity.private_key, self.peer_id, rsa_public_key(self.authorizer), self.ttl)
            self.files.write_token(token.SerializeToString())
            self._renewed = time.time()
        version, allow, deny = self.ledger.swarm_lists()
        if version != self.files.version():
            self.files.write_lists(version, allow, deny)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(ACCESS_REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception:  # a busy ledger must not stop the keeper; the next tick retries
                log.exception("could not refresh swarm access")


def _start_dht(host: str, dht_port: int, data_dir: Path, authorizer):
    import hivemind  # imported late: it is slow to import and only serve needs it

    use_fork_start_method()
    try:
        return hivemind.DHT(
            host_maddrs=[f"/ip4/{host}/tcp/{dht_port}"],
            identity_path=str(Path(data_dir) / DHT_IDENTITY_FILE),
            authorizer=authorizer,
            start=True,
        )
    except Exception as error:  # hivemind raises bare exceptions from its daemon
        raise UserError(f"could not start the swarm's DHT node on {host}:{dht_port}: {error}") from None


def _auditor_args(run_path: Path, data_dir: Path, dht_maddrs: list[str]) -> list[str]:
    """The auditor runs in its own process (it replays work and joins the swarm as a client)."""
    return [sys.executable, "-m", "coordinator.auditor", str(Path(run_path).resolve()),
            str(Path(data_dir).resolve()), *dht_maddrs]


def _checkpoints_possible(config: RunConfig) -> bool:
    """Checkpoints need the task's model (to check what the swarm sends); without it, serve on, warned."""
    from peer.task import load_task

    if config.checkpoint_every <= 0:
        return False
    try:
        load_task(config.task_name, config.task_version)
    except UserError as error:
        print(f"warning: no checkpoints for this run: {error}", file=sys.stderr, flush=True)
        return False
    return True


def _observer_args(run_path: Path, data_dir: Path, host: str, dht_maddrs: list[str]) -> list[str]:
    """The checkpoint writer, in its own process (it forks hivemind's; this process will run gRPC)."""
    args = [sys.executable, "-m", "coordinator.observer", "--run", str(Path(run_path).resolve()),
            "--data-dir", str(Path(data_dir).resolve()), "--host", host]
    for maddr in dht_maddrs:
        args += ["--initial-peer", maddr]
    return args


@dataclass(frozen=True)
class Transport:
    """--insecure, or TLS with the operator's --cert/--key (else a self-signed pair in the data dir)."""

    insecure: bool = False
    cert: Path | None = None
    key: Path | None = None


def serve(run_path: Path, data_dir: Path, host: str, port: int, dht_port: int, transport: Transport = Transport(),
          dashboard_port: int | None = None, store: str | None = None) -> None:
    """Run the coordinator until SIGINT/SIGTERM; ``dashboard_port`` None: no dashboard; ``store``: a
    postgresql:// URL for the books (None: the sqlite file in the data dir)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # from the start: a stop during start-up still tears down
        signal.signal(signum, lambda *_: stop.set())
    with ExitStack() as teardown:  # the one teardown: each part is registered as it starts, undone in reverse
        _serve(run_path, Path(data_dir), host, port, dht_port, transport, dashboard_port, stop, teardown, store)
        stop.wait()
        print("coordinator stopping", flush=True)


def _serve(run_path: Path, data_dir: Path, host: str, port: int, dht_port: int, transport: Transport,
           dashboard_port: int | None, stop: threading.Event, teardown: ExitStack, store: str | None = None) -> None:
    config = load_run_config(run_path)
    data_dir.mkdir(parents=True, exist_ok=True)
    teardown.enter_context(lock_data_dir(data_dir))
    first_start = not (data_dir / LEDGER_FILE).exists()
    identity = load_or_create_identity(data_dir, KEY_FILE)
    material = None if transport.insecure else tls.load_or_create(data_dir, host, transport.cert, transport.key)
    ledger = Ledger(store or data_dir / LEDGER_FILE)
    teardown.callback(ledger.close)
    if store:
        first_start = ledger.meta("run_id") is None
        os.environ[STORE_ENV] = store  # for the auditor and the observer (coordinator/books/connection.py)
    else:
        os.environ.pop(STORE_ENV, None)
    ledger.bind_run(config.run_id, config.config_hash)
    token = _default_token(ledger, data_dir, identity, config)
    keeper = SwarmAccessKeeper(data_dir, ledger, identity, config)

    forks_die_with_this_process()  # hivemind's DHT process goes with serve, even after a kill -9
    dht = _start_dht(host, dht_port, data_dir, keeper.authorizer)
    teardown.callback(dht.shutdown)
    dht_maddrs = [str(addr) for addr in dht.get_visible_maddrs()]
    children = teardown.enter_context(Supervisor())  # stopped before the DHT they talk to
    children.start("auditor", _auditor_args(run_path, data_dir, dht_maddrs), AUDITOR_GRACE, data_dir / AUDITOR_LOG)
    if _checkpoints_possible(config):
        children.start("observer", _observer_args(run_path, data_dir, host, dht_maddrs), OBSERVER_GRACE)

    state = CachedState(lambda: run_state(ledger, config.peer_timeout, data_dir))
    metrics = Metrics(state)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS),
        # the latency interceptor is outermost, so RPC latency includes the signature check
        interceptors=[metrics.interceptor(), SignedRequestInterceptor(ledger, config.run_id)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(ledger, config, dht_maddrs, identity,
                                                                      data_dir=data_dir, on_admitted=keeper.refresh),
                                              server)
    try:
        if material is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            credentials = grpc.ssl_server_credentials([(material.key_pem, material.cert_pem)])
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise UserError(f"cannot listen on {host}:{port} (port {port} in use or not permitted); "
                        f"pick another --port, or 0")
    dashboard = Dashboard(host, dashboard_port, state, metrics).start() if dashboard_port is not None else None
    if dashboard is not None:
        teardown.callback(dashboard.stop)
    server.start()
    teardown.callback(lambda: server.stop(grace=2).wait())
    address = f"{host}:{bound}"
    _write_info(data_dir, {
        "address": address,
        "dht_maddrs": dht_maddrs,
        "pid": os.getpid(),
        "run_id": config.run_id,
        "run_config_hash": config.config_hash,
        "public_key": identity.public_bytes.hex(),
        "tls_fingerprint": material.fingerprint if material else None,
        "dashboard": dashboard.url if dashboard else None,
        "children": children.pids(),
    })
    threading.Thread(target=keeper.run, args=(stop,), name="swarm-access", daemon=True).start()

    print(f"potluck coordinator for run '{config.run_id}' ({'new' if first_start else 'resumed'} ledger "
          f"{ledger.describe()})", flush=True)
    print(f"  gRPC     {address}", flush=True)
    print(f"  swarm    {dht_maddrs[0] if dht_maddrs else '(no address)'}", flush=True)
    if dashboard is not None:
        print(f"  dashboard {dashboard.url}", flush=True)
    checkpoint = latest_checkpoint(data_dir)
    if checkpoint is not None:
        print(f"  resume   from checkpoint epoch {checkpoint.epoch} ({checkpoint.file}) if no peer is left",
              flush=True)
    if material is None:
        print("  WARNING: --insecure: plaintext gRPC; anyone on the path can read and alter traffic", flush=True)
    else:
        print(f"  TLS      sha256 fingerprint {material.fingerprint}", flush=True)
    print("Volunteers join with:", flush=True)
    print(f"  {join_command(address, token, material.fingerprint if material else None)}", flush=True)
    print("Tokens for partner orgs: coordinator token issue --org NAME"
          f" --data-dir {data_dir}" + (f" --store {ledger.describe()}" if store else ""), flush=True)
