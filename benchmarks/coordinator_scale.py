"""``python -m benchmarks coordinator_scale --peers 1000,5000,10000 --out F.json``: what one Heartbeat
and one Join cost as the run grows (issue 12: "nobody has measured how many peers one coordinator holds").

For each N it builds a real coordinator ledger (a sqlite file in a temp dir, through the coordinator's
own Ledger, Credit and token code) with N admitted peers, ``--reports`` reports each and one audit
verdict per peer, then calls the real servicer (coordinator/service.py) in-process, without gRPC,
TLS or request signing (their cost does not depend on N). Heartbeats are sent by random admitted
peers, Joins by new identities; the calls alternate between the ledgers of every N round by round, so
a busy disk or CPU slows every N alike. Figures per N: median and p99 milliseconds per call.

Filling the ledger is not what is measured: it runs with ``synchronous=OFF`` and without the run
epoch rule (so reports do not recompute the epoch one by one); the measured calls run as serve
runs them (``synchronous=FULL``, the rule on).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
RUN_TOML = ROOT / "examples" / "digits" / "run.toml"
SWARM_KEY = b"k" * 32  # stands in for the DHT's RSA key: the coordinator only signs it into the access token


class Refused(Exception):
    pass


class Context:
    """The part of grpc.ServicerContext the handlers use: abort raises."""

    def abort(self, code, details):
        raise Refused(f"{code}: {details}")

    def peer(self):
        return "ipv4:127.0.0.1:1"


@dataclass
class Coordinator:
    """One filled ledger with its servicer, and the sessions of its admitted peers."""
    n: int
    service: object
    token: str
    sessions: list[tuple[str, str]]  # (peer id, session)

    def heartbeat(self, rng: random.Random):
        from protos import coordinator_pb2 as pb

        peer_id, session = rng.choice(self.sessions)
        version = self.service.ledger.swarm_lists()[0]  # the peer holds the current lists
        request = pb.HeartbeatRequest(peer_id=peer_id, session=session, epoch=3, samples_per_second=50.0,
                                      access_lists_version=version)
        start = time.perf_counter()
        self.service.Heartbeat(request, Context())
        return time.perf_counter() - start

    def join(self, rng: random.Random):
        from peer.identity import Identity
        from protos import coordinator_pb2 as pb

        identity = Identity(Ed25519PrivateKey.generate())
        request = pb.JoinRequest(token=self.token, public_key=identity.public_bytes,
                                 hivemind_peer_id=f"Qm{uuid.UUID(int=rng.getrandbits(128)).hex}", device="cpu",
                                 client_version="0.1.0", swarm_auth_key=SWARM_KEY)
        start = time.perf_counter()
        self.service.Join(request, Context())
        return time.perf_counter() - start


def build(workdir: Path, n: int, reports: int, rng: random.Random) -> Coordinator:
    """A ledger with n admitted peers (``reports`` reports and one passed audit each) and its servicer."""
    from coordinator import tokens
    from coordinator.books.credit import PASS, Credit
    from coordinator.books.ledger import Ledger
    from coordinator.service import CoordinatorService
    from peer.identity import Identity
    from peer.runconfig import load_run_config

    config = load_run_config(RUN_TOML)
    identity = Identity(Ed25519PrivateKey.generate())
    path = workdir / f"ledger-{n}.sqlite"
    ledger = Ledger(path)  # no epoch rule while filling
    credit = Credit(path, config.verification, config.run_id, proof_required=False)
    ledger.bind_run(config.run_id, config.config_hash)
    ledger.add_org("volunteers")
    token, claims = tokens.issue(ledger, identity.private_key, config.run_id, "volunteers", 0, 0)
    for store in (ledger, credit):
        store._db.execute("PRAGMA synchronous=OFF")
    sessions = []
    for index in range(n):
        peer_id = f"p-{index:016x}"
        admission = ledger.admit(claims, peer_id, bytes(32), f"Qm{index:044x}", "cpu", SWARM_KEY)
        sessions.append((peer_id, admission.session))
        for epoch in range(reports):
            ledger.record_report(peer_id, admission.session, uuid.UUID(int=rng.getrandbits(128)).hex, epoch, 64,
                                 1.0, 1.0, {})
        credit.record_audit(None, peer_id, 0, 0, PASS, 0.01, 1.0, "replay matched")
    for store in (ledger, credit):
        store._db.execute("PRAGMA synchronous=FULL")
    service = CoordinatorService(ledger, config, [], identity, credit=credit)
    return Coordinator(n, service, token, sessions)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def figures(seconds: list[float]) -> dict:
    return {"calls": len(seconds), "median_ms": round(1000 * statistics.median(seconds), 3),
            "p99_ms": round(1000 * percentile(seconds, 0.99), 3)}


def measure(peers: list[int], calls: int = 300, reports: int = 3, workdir: Path | None = None,
            seed: int = 0, log=lambda line: None) -> dict:
    """{"N": {"heartbeat": {...}, "join": {...}, "build_seconds": s}} for each N in ``peers``."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="coordinator-scale-", dir=workdir) as tmp:
        coordinators, built = [], {}
        for n in peers:
            start = time.perf_counter()
            coordinators.append(build(Path(tmp), n, reports, rng))
            built[n] = round(time.perf_counter() - start, 2)
            log(f"built a ledger of {n} peers in {built[n]:.1f}s")
        times = {n: {"heartbeat": [], "join": []} for n in peers}
        for kind in ("heartbeat", "join"):
            for coordinator in coordinators:  # one unmeasured call each: caches and pages warm as in a running serve
                getattr(coordinator, kind)(rng)
            for _ in range(calls):
                for coordinator in coordinators:  # round by round, so load hits every N alike
                    times[coordinator.n][kind].append(getattr(coordinator, kind)(rng))
            log(f"{kind}: " + ", ".join(f"{n} peers {1000 * statistics.median(times[n][kind]):.2f} ms"
                                        for n in peers))
        for coordinator in coordinators:
            coordinator.service.credit.close()
            coordinator.service.ledger.close()
    return {str(n): {"peers": n, "reports_per_peer": reports, "build_seconds": built[n],
                     "heartbeat": figures(times[n]["heartbeat"]), "join": figures(times[n]["join"])}
            for n in peers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks coordinator_scale",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--peers", default="1000,5000,10000", help="comma-separated peer counts (default %(default)s)")
    parser.add_argument("--calls", type=int, default=300, help="measured calls per kind and N (default %(default)s)")
    parser.add_argument("--reports", type=int, default=3, help="reports per peer (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    args = parser.parse_args(argv)
    try:
        peers = [int(p) for p in args.peers.split(",")]
    except ValueError:
        print(f"error: --peers must be comma-separated integers, got {args.peers!r}", file=sys.stderr)
        return 2
    if not peers or min(peers) < 1 or args.calls < 1 or args.reports < 0:
        print("error: --peers values and --calls must be >= 1, --reports >= 0", file=sys.stderr)
        return 2
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    results = measure(peers, args.calls, args.reports, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{'peers':>8} {'heartbeat median':>17} {'p99':>9} {'join median':>12} {'p99':>9}  (ms per call)")
    for row in results.values():
        print(f"{row['peers']:>8} {row['heartbeat']['median_ms']:>17.2f} {row['heartbeat']['p99_ms']:>9.2f} "
              f"{row['join']['median_ms']:>12.2f} {row['join']['p99_ms']:>9.2f}")
    args.out.write_text(json.dumps({"coordinator_scale": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
