"""The volunteer's CLI: `peer join ADDRESS --token TOKEN`, `peer id`."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from peer import __version__, timeouts
from peer.cli_support import new_app, run_app
from peer.errors import EVICTED_PREFIX, UserError
from peer.identity import load_or_create_identity

app = new_app("peer", "Lend your machine to a potluck training run.")

DEFAULT_DATA_DIR = Path.home() / ".potluck" / "peer"
DataDir = Annotated[
    Path, typer.Option("--data-dir", envvar="POTLUCK_PEER_DIR", help="Where this peer's identity and state live.")
]

CHECKPOINT_FETCH_TIMEOUT = timeouts.CHECKPOINT_FETCH  # seconds for the whole checkpoint download at join
SHUTDOWN_GRACE = timeouts.SHUTDOWN_GRACE  # seconds hivemind may take to stop before the process exits anyway


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ProgressMode(str, Enum):
    auto = "auto"
    live = "live"
    plain = "plain"
    json = "json"
    quiet = "quiet"


class TextOrJson(str, Enum):
    text = "text"
    json = "json"



class _HandledByUs(logging.Filter):
    """Drops hivemind's traceback for a donor that failed during a state download: the next donor
    is tried, and peer/state_download.py says in one line when no donor delivered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "_load_state_from_peers"


def quiet_handled_retries() -> None:
    logging.getLogger("hivemind.averaging.averager").addFilter(_HandledByUs())


@app.command("id")
def id_command(data_dir: DataDir = DEFAULT_DATA_DIR):
    """Print this peer's id (created on first use, then reused)."""
    print(load_or_create_identity(data_dir).peer_id)


@app.command("join")
def join_command(
    address: Annotated[str, typer.Argument(help="The coordinator's address, HOST:PORT.")],
    token: Annotated[str, typer.Option("--token", envvar="POTLUCK_TOKEN", help="Join token from the run's operator.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    device: Annotated[Device, typer.Option(help="Where to train: cuda when present with auto.")] = Device.auto,
    max_epochs: Annotated[int, typer.Option(help="Leave after this many epochs (0: until the run ends).", min=0)] = 0,
    host: Annotated[str, typer.Option(help="Address this peer's swarm node listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Swarm (DHT) port; 0 picks a free one.", min=0, max=65535)] = 0,
    public_ip: Annotated[Optional[str], typer.Option(help="Address other peers should dial (default: --host).")] = None,
    client_mode: Annotated[bool, typer.Option("--client-mode", help="Accept no connections: train as a client "
                                              "(skips the reachability test).")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).", min=0)] = 0,
    fingerprint: Annotated[Optional[str], typer.Option(
        envvar="POTLUCK_FINGERPRINT",
        help="SHA-256 of the coordinator's TLS certificate, from the join command; the peer refuses any other.")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure",
        help="Talk plaintext gRPC to a coordinator started with --insecure. RISK: your token and reports can be "
             "read and altered by anyone on the network path.")] = False,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.")] = timeouts.CONNECT,
    progress: Annotated[ProgressMode, typer.Option(help="live panel, plain lines, json event lines, or quiet.")]
    = ProgressMode.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show hivemind's and gRPC's logs on the "
                                          "terminal too (they always go to peer.log in the data dir).")] = False,
):
    """Join a run: train with the swarm until the run ends, --max-epochs, or Ctrl-C."""
    from peer.address import normalize_fingerprint, split_address

    # what the volunteer typed is checked before torch and hivemind load (seconds): a typo answers at once
    split_address(address)
    if not token.strip():
        raise UserError("--token is empty: copy the whole join command printed by 'coordinator serve'")
    if insecure and fingerprint:
        raise UserError("--insecure and --fingerprint contradict each other; use the join command as printed")
    if not insecure and not fingerprint:
        raise UserError("missing --fingerprint: copy the whole join command printed by 'coordinator serve' "
                        "(it pins the coordinator's TLS certificate)")
    pinned = None if insecure else normalize_fingerprint(fingerprint)

    from peer.logfile import quiet_grpc, route_logs

    quiet_grpc(verbose)  # before grpc is imported
    import torch

    from peer.checkpoint import training_state_from_bytes
    from peer.resume import resume_lines
    from peer.client import Admission, CoordinatorLink, fetch_checkpoint, join, leave
    from peer.events import EventLog
    from peer.outbox import Outbox
    from peer.report import sign_report
    from peer.pidfile import remove_pidfile, running_peer, write_pidfile
    from peer.reachability import check_reachability, fix_it_message, free_port
    from peer.runconfig import parse_run_config
    from peer.swarm import start_dht, swarm_peer_id
    from peer.swarm_access import AccessFiles, install_averaging_guard, make_authorizer, rsa_public_key
    from peer.task import load_task
    from peer.trainer import TrainOptions, pick_device, train
    from peer.transport import Endpoint
    from protos import coordinator_pb2 as pb

    if not verbose:
        quiet_handled_retries()
    endpoint = Endpoint(address, pinned, insecure)
    json_mode = progress is ProgressMode.json
    say = (lambda text: None) if json_mode else (lambda text: print(text, flush=True))
    if threads:
        torch.set_num_threads(threads)
    data_dir.mkdir(parents=True, exist_ok=True)
    route_logs(data_dir, verbose)  # hivemind's and gRPC's logs: data_dir/peer.log (-v: the terminal too)
    other = running_peer(data_dir)
    if other is not None:
        raise UserError(f"a peer (pid {other['pid']}) is already running from {data_dir}; stop it with "
                        f"'peer leave --data-dir {data_dir}' or use another --data-dir")
    identity = load_or_create_identity(data_dir)
    chosen_device = pick_device(device.value)
    authorizer = make_authorizer(data_dir, b"")  # the coordinator's key is known after Join; set below
    reply = join(
        endpoint, identity,
        pb.JoinRequest(token=token, public_key=identity.public_bytes, hivemind_peer_id=swarm_peer_id(data_dir),
                       device=str(chosen_device), client_version=__version__,
                       swarm_auth_key=rsa_public_key(authorizer)),
        connect_timeout,
    )
    config = parse_run_config(reply.run_config_toml, where="the run config sent by the coordinator")
    if config.config_hash != reply.run_config_hash:
        raise UserError("the run config arrived corrupted (hash mismatch); join again")
    try:
        task = load_task(config.task_name, config.task_version)
    except UserError as error:
        leave(endpoint, identity, config.run_id, reply.peer_id, reply.session, f"cannot train: {error}")
        raise
    access = AccessFiles(data_dir)
    access.write_token(reply.access_token)
    access.write_lists(reply.access_lists.version, list(reply.access_lists.allow), list(reply.access_lists.deny))
    authorizer.coordinator_public_key = reply.coordinator_public_key
    install_averaging_guard(data_dir)
    write_pidfile(data_dir, coordinator=address, run_id=config.run_id, peer_id=reply.peer_id)
    try:
        events = EventLog(data_dir, echo=json_mode)
        say(f"joined run '{config.run_id}' as {reply.peer_id} (org {reply.org}) on {chosen_device}")
        events.emit("joined", peer_id=reply.peer_id, org=reply.org, run_id=config.run_id,
                    coordinator_epoch=reply.epoch, coordinator=address, device=str(chosen_device))
        initial_state = None
        if reply.start_from_checkpoint and reply.checkpoint_sha256:
            # nobody is left to load state from: continue from the coordinator's checkpoint, fetched
            # before hivemind forks its processes (no gRPC channel may be open across a fork)
            data = fetch_checkpoint(endpoint, identity, config.run_id, reply.peer_id, reply.session,
                                    reply.checkpoint_sha256, reply.checkpoint_bytes, CHECKPOINT_FETCH_TIMEOUT)
            initial_state = (reply.checkpoint_epoch,
                             training_state_from_bytes(data, reply.checkpoint_sha256, "run's checkpoint"),
                             reply.checkpoint_sha256)
        for line in resume_lines(reply, initial_state[1] if initial_state else None, config.averaging.strategy):
            say(line)
            events.emit("resume_notice", text=line)

        if not client_mode:
            port = port or free_port(host)
            result = check_reachability(endpoint, identity, config.run_id, reply.peer_id, reply.session, host,
                                        public_ip or host, port)
            events.emit("reachability", checked=result.checked, reachable=result.reachable,
                        address=f"{result.host}:{result.port}", detail=result.detail)
            if not result.reachable:
                print(fix_it_message(result), file=sys.stderr, flush=True)
                client_mode = True

        try:
            dht = start_dht(data_dir, list(reply.initial_peers), host, port, client_mode=client_mode,
                            authorizer=authorizer, public_ip=public_ip,
                            say=lambda text: print(text, file=sys.stderr, flush=True))
        except UserError as error:  # the bootstrap bound passed: tell the coordinator, then one error line
            leave(endpoint, identity, config.run_id, reply.peer_id, reply.session, f"cannot join the swarm: {error}")
            raise
        outbox = Outbox(data_dir)
        admission = Admission(identity, reply.peer_id, reply.session, config.run_id, access, config.access_token_ttl)

        def make_link() -> CoordinatorLink:
            return CoordinatorLink(endpoint, admission, outbox, config.heartbeat_interval,
                                   sign=lambda request: sign_report(request, config.run_id, identity.private_key))

        summary = train(config, task, reply.peer_id, dht, make_link, events,
                        TrainOptions(data_dir, chosen_device, max_epochs, progress.value,
                                     initial_state=initial_state, client_mode=client_mode))
        accuracy = summary["metrics"].get("accuracy")
        said = "gave up, see the error below" if summary.get("error") else summary["reason"]
        say(f"left at epoch {summary['epoch']} ({said}): {summary['samples']:,} samples contributed"
            + (f", held-out accuracy {accuracy:.3f}" if accuracy is not None else ""))
        events.emit("left", reason=summary["reason"])
        events.close()
        if summary.get("error"):
            print(f"error: {summary['error']}", file=sys.stderr, flush=True)
            exit_code = 2
        elif summary["reason"].startswith(EVICTED_PREFIX):
            print(f"error: {summary['reason']}; contact the run's operator", file=sys.stderr, flush=True)
            exit_code = 3
        else:
            exit_code = 0
        outbox.close()
    finally:
        remove_pidfile(data_dir)
    # hivemind's shutdown can hang (trap 10): give it a bounded grace, then exit regardless
    watchdog = threading.Timer(SHUTDOWN_GRACE, lambda: os._exit(exit_code))
    watchdog.daemon = True
    watchdog.start()
    dht.shutdown()
    if exit_code:
        raise typer.Exit(exit_code)


@app.command("status")
def status_command(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    format: Annotated[TextOrJson, typer.Option("--format", help="text for people, json for scripts.")]
    = TextOrJson.text,
):
    """Show this peer: identity, whether it is running, the runs it joined, samples and credit."""
    from peer.peer_status import peer_status, render_peer_status

    status = peer_status(data_dir)
    if format is TextOrJson.json:
        print(json.dumps(status, indent=2))
    else:
        render_peer_status(status)


@app.command("leave")
def leave_command(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer to finish leaving.", min=1)] = 60.0,
):
    """Ask the peer running from this data dir to leave cleanly (as Ctrl-C would), and wait for it."""
    from peer.peer_status import ask_to_leave

    record = ask_to_leave(data_dir, timeout)
    print(f"peer {record.get('peer_id', '?')} (pid {record['pid']}) left run '{record.get('run_id', '?')}'")


def main() -> None:
    run_app(app)
