"""``python -m benchmarks capacity --peers N --out F.json``: how many peers one real coordinator holds
(issue 12, figure e), measured against a real ``coordinator serve`` process.

It starts ``coordinator serve`` (TLS, the real CLI, a temp data dir, a copy of examples/digits/run.toml
with the chosen heartbeat interval and no last epoch), adds ``--orgs`` orgs with the CLI, and starts
``--generators`` load-generator processes (benchmarks/capacity_load.py) on loopback that join N
simulated peers (each its own Ed25519 identity, its org's token) and then heartbeat at the run's
interval and report once per ``--epoch-seconds``, through the peer's own signing and TLS code.
After every peer joined and a warm-up (each peer's first heartbeat fetches the access lists that
the later joins changed), it measures ``--seconds``: acknowledged heartbeats/s and reports/s (calls
started in the window), their p50/p99 latency as the peer sees it, the CPU (cores) and RSS of serve
and its children (auditor, observer, DHT daemon) from /proc, and the load generators' own CPU: on a
small machine they compete with the coordinator for the same cores.

``--stores sqlite,postgresql`` (default: both when PostgreSQL's binaries are found, else sqlite and a
note) measures each store in turn with the same load. For postgresql it starts its own throwaway server
(benchmarks/postgres_server.py: initdb, 127.0.0.1, a free port, fsync on, since the figure is about
durable reports), creates a database, runs serve with ``--store`` (the org and token commands get it
through the environment), and also records the server's own CPU and RSS (the postmaster and its
backends), which are not in the coordinator's figures. The JSON has one object per store, same keys;
a store not measured is null.
Every process started here is ended by PID (the PostgreSQL server by ``pg_ctl stop`` on its own data
folder), also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.procs import ROOT, Processes, child_env, process_tree
from benchmarks.procs import proc_stat as _stat

STORES = ("sqlite", "postgresql")

BIN = Path(sys.executable).parent
RUN_TOML = ROOT / "examples" / "digits" / "run.toml"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- /proc ------------------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each live pid, in seconds."""
    seconds = {}
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            seconds[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total / 2 ** 20


def cores(before: dict[int, float], after: dict[int, float], seconds: float) -> float:
    """Cores used over the window by the processes seen at its end (one that started meanwhile from 0)."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after) / seconds


# --- figures ------------------------------------------------------------------------------------------
def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 2)


def server_latency(before: str, after: str, method: str) -> dict:
    """p50/p99 of one handler's time inside serve over the window (the interceptor's histogram, so each
    figure is a bucket's upper bound), from two scrapes of /metrics."""
    def buckets(text: str) -> dict[float, float]:
        found = {}
        for match in re.finditer(r'potluck_rpc_latency_seconds_bucket\{code="OK",le="([^"]+)",method="'
                                 + method + r'"\} (\S+)', text):
            found[float(match.group(1))] = float(match.group(2))
        return found

    start, end = buckets(before), buckets(after)
    counts = sorted((le, end[le] - start.get(le, 0.0)) for le in end)
    total = counts[-1][1] if counts else 0
    figures = {"calls": int(total)}
    for name, q in (("p50_ms_at_most", 0.5), ("p99_ms_at_most", 0.99)):
        bound = next((le for le, n in counts if total and n >= q * total), None)
        figures[name] = None if bound is None else (1000 * bound if bound != float("inf") else "over 10000")
    return figures


# --- the run ----------------------------------------------------------------------------------------
def write_run(path: Path, interval: float) -> Path:
    """examples/digits/run.toml with the heartbeat interval asked for, no last epoch (a long window must
    not end the run) and a peer timeout of at least 5 intervals."""
    text = RUN_TOML.read_text()
    text = re.sub(r"(?m)^epochs = \d+", "epochs = 0", text)
    text = re.sub(r"(?m)^heartbeat_interval = [0-9.]+", f"heartbeat_interval = {interval}", text)
    text = re.sub(r"(?m)^peer_timeout = [0-9.]+", f"peer_timeout = {max(10.0, 5 * interval)}", text)
    path.write_text(text)
    return path


def cli(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([str(BIN / "coordinator"), *args], capture_output=True, text=True, env=child_env(env),
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"coordinator {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def scrape(url: str | None) -> str:
    if not url:
        return ""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=30) as response:
            return response.read().decode()
    except OSError:
        return ""


def stop_serve(processes: Processes, serve, tree: list[int]) -> list[int]:
    """SIGINT to serve (its own teardown stops its children), then SIGKILL by PID whatever of its tree
    is left; returns the PIDs still there after that (should be none)."""
    processes.stop([serve], grace=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_stat(pid) for pid in tree):
        time.sleep(0.2)
    for pid in tree:
        if _stat(pid) is not None and _stat(pid)[0] != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(0.5)
    return [pid for pid in tree if _stat(pid) is not None and _stat(pid)[0] != "Z"]


def measure(peers: int, seconds: float = 60.0, interval: float = 2.0, epoch_seconds: float = 10.0,
            generators: int = 2, orgs: int = 2, warmup: float | None = None, workdir: Path | None = None,
            log=lambda line: None, store: str | None = None, database_pid: int | None = None) -> dict:
    """The figures of one coordinator holding ``peers`` simulated peers (see the module doc): on sqlite,
    or on the PostgreSQL database ``store`` (a URL) whose server's postmaster is ``database_pid``."""
    from coordinator.books.connection import STORE_ENV
    from peer.runconfig import load_run_config
    from peer.timeouts import CALL

    t0 = time.monotonic()
    say = lambda line: log(f"[{time.monotonic() - t0:6.1f}s] {line}")  # noqa: E731
    generators = max(1, min(generators, peers))
    warmup = max(2 * interval, 4.0) if warmup is None else warmup
    store_env = {STORE_ENV: store} if store else None
    database_tree = (lambda: process_tree(database_pid)) if database_pid else (lambda: [])
    with tempfile.TemporaryDirectory(prefix="capacity-", dir=workdir) as tmp:
        folder = Path(tmp)
        control = folder / "control"
        control.mkdir()
        run_file = write_run(folder / "run.toml", interval)
        config = load_run_config(run_file)
        processes = Processes(folder / "logs")
        serve, tree, gens, left = None, [], [], []
        try:
            data = folder / "coordinator"
            started = time.monotonic()
            serve = processes.start([str(BIN / "coordinator"), "serve", "--run", str(run_file), "--data-dir",
                                     str(data), "--port", "0", "--dashboard-port", "0",
                                     *(("--store", store) if store else ())], "serve")
            info = processes.wait_for(
                lambda: (i := _read_json(data / "coordinator.json")) and i.get("pid") == serve.pid and i,
                120, "coordinator.json", [serve], with_log=True)
            say(f"serve (pid {serve.pid}) up in {time.monotonic() - started:.1f}s at {info['address']}")
            tokens = [(data / "default-org.token").read_text().strip()]
            for index in range(1, orgs):
                cli("org", "add", f"org-{index}", "--data-dir", str(data), env=store_env)
                tokens.append(json.loads(cli("token", "issue", "--org", f"org-{index}", "--max-peers", "0",
                                             "--format", "json", "--data-dir", str(data), env=store_env))["token"])
            say(f"{orgs} orgs with their tokens")
            share, first = [peers // generators + (g < peers % generators) for g in range(generators)], 0
            for g, count in enumerate(share):
                spec = {"name": f"g{g}", "control": str(control), "address": info["address"],
                        "fingerprint": info["tls_fingerprint"], "run_id": config.run_id, "tokens": tokens,
                        "peers": count, "first": first, "seed": g, "interval": interval,
                        "epoch_seconds": epoch_seconds, "micro_batch_size": config.micro_batch_size,
                        "call_timeout": CALL, "access_token_ttl": config.access_token_ttl}
                first += count
                (control / f"spec-g{g}.json").write_text(json.dumps(spec))
                gens.append(processes.start([sys.executable, "-m", "benchmarks.capacity_load",
                                             str(control / f"spec-g{g}.json")], f"g{g}"))
            started = time.monotonic()
            joined = processes.wait_for(
                lambda: (j := [_read_json(control / f"joined-g{g}.json") for g in range(generators)]) and all(j) and j,
                max(120.0, peers * 0.1), "the simulated peers to join", [serve, *gens], with_log=True)
            join_seconds = time.monotonic() - started
            admitted = sum(j["admitted"] for j in joined)
            join_latencies = [x for j in joined for x in j["join_latencies"]]
            say(f"{admitted} of {peers} peers admitted in {join_seconds:.1f}s"
                + "".join(f"; refused: {e}" for j in joined for e in j["errors"][:1]))
            start = time.time() + warmup
            end = start + seconds
            tmp_go = control / "go.json.tmp"
            tmp_go.write_text(json.dumps({"start": start, "end": end}))
            tmp_go.rename(control / "go.json")
            processes.sleep(max(0.0, start - time.time() - 1.5))
            metrics_before = scrape(info.get("dashboard"))
            processes.sleep(max(0.0, start - time.time()))
            tree = process_tree(serve.pid)
            gen_pids = [pid for popen in gens for pid in process_tree(popen.pid)]
            serve_before, gen_before = cpu_seconds(tree), cpu_seconds(gen_pids)
            database_before = cpu_seconds(database_tree())
            rss_peak = {"serve": 0.0, "tree": 0.0, "database": 0.0}
            load_average = os.getloadavg()  # the machine's other work: this box may be shared
            while time.time() < end:
                processes.sleep(min(1.0, max(0.0, end - time.time())))
                rss_peak["serve"] = max(rss_peak["serve"], rss_mb([serve.pid]))
                rss_peak["tree"] = max(rss_peak["tree"], rss_mb(process_tree(serve.pid)))
                rss_peak["database"] = max(rss_peak["database"], rss_mb(database_tree()))
            load_average = [max(a, b) for a, b in zip(load_average, os.getloadavg())]
            tree = process_tree(serve.pid)
            serve_after, gen_after = cpu_seconds(tree), cpu_seconds(gen_pids)
            database_after = cpu_seconds(database_tree())
            metrics_after = scrape(info.get("dashboard"))
            say(f"measured {seconds:.0f}s; waiting for the load generators' last replies")
            results = processes.wait_for(
                lambda: (r := [_read_json(control / f"result-g{g}.json") for g in range(generators)]) and all(r) and r,
                CALL + 60, "the load generators' results", [serve], with_log=True)
            for popen in gens:
                popen.wait(timeout=30)
        finally:
            if serve is not None:
                tree = sorted(set(tree) | set(process_tree(serve.pid)))
                left = stop_serve(processes, serve, tree)
                say(f"serve stopped{f'; still running: {left}' if left else ''}")
            processes.close()
        counts: dict[str, int] = {}
        details = []
        for result in results:
            for key, value in result["counts"].items():
                if key == "error_details":
                    details.extend(value)
                else:
                    counts[key] = counts.get(key, 0) + value
        heartbeats = [x for r in results for x in r["heartbeat_latencies"]]
        reports = [x for r in results for x in r["report_latencies"]]
        serve_only = {serve.pid: serve_after.get(serve.pid, 0.0)}
        children = {pid: s for pid, s in serve_after.items() if pid != serve.pid}
        return {
            "store": "postgresql" if store else "sqlite",
            "peers": peers,
            "admitted": admitted,
            "heartbeats_per_s": round(counts.get("Heartbeat_ok", 0) / seconds, 1),
            "heartbeat_p50_ms": percentile_ms(heartbeats, 0.5),
            "heartbeat_p99_ms": percentile_ms(heartbeats, 0.99),
            "reports_per_s": round(counts.get("Report_ok", 0) / seconds, 1),
            "report_p50_ms": percentile_ms(reports, 0.5),
            "report_p99_ms": percentile_ms(reports, 0.99),
            "coordinator_cpu": round(cores(serve_before, serve_after, seconds), 2),
            "rss_mb": round(rss_peak["tree"], 1),
            "offered_heartbeats_per_s": round(admitted / interval, 1),
            "offered_reports_per_s": round(admitted / epoch_seconds, 1),
            "serve_cpu": round(cores(serve_before, serve_only, seconds), 2),
            "serve_children_cpu": round(cores(serve_before, children, seconds), 2),
            "serve_rss_mb": round(rss_peak["serve"], 1),
            "load_generator_cpu": round(cores(gen_before, gen_after, seconds), 2),
            # the PostgreSQL server's postmaster and backends (null on sqlite: it is inside serve)
            "database_cpu": round(cores(database_before, database_after, seconds), 2) if database_pid else None,
            "database_rss_mb": round(rss_peak["database"], 1) if database_pid else None,
            "server_side": {"heartbeat": server_latency(metrics_before, metrics_after, "Heartbeat"),
                            "report": server_latency(metrics_before, metrics_after, "Report")},
            "join_seconds": round(join_seconds, 1),
            "join_p50_ms": percentile_ms(join_latencies, 0.5),
            "join_p99_ms": percentile_ms(join_latencies, 0.99),
            "counts": counts,
            "errors": details,
            "pending_reports_at_end": sum(r["pending_reports_at_end"] for r in results),
            "load_average": [round(x, 1) for x in load_average],
            "seconds": seconds, "warmup_seconds": warmup, "heartbeat_interval": interval,
            "epoch_seconds": epoch_seconds, "generators": generators, "orgs": orgs, "cpus": os.cpu_count(),
            "processes": {"serve_tree": tree, "load_generators": [p.pid for p in gens], "left_behind": left,
                          "database_server": database_pid},
        }


def measure_postgresql(peers: int, *args, workdir: Path | None = None, log=lambda line: None, **kwargs) -> dict:
    """``measure`` on a throwaway PostgreSQL server started here (fsync on) and stopped afterwards, also on
    Ctrl-C or an error."""
    from benchmarks.postgres_server import Server, binaries

    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    started = time.monotonic()
    server = Server(bin_dir, fsync=True)  # in the system temp: a private --workdir may bar the server user
    try:
        server.start()
        url = server.create_database()
        log(f"PostgreSQL server (postmaster pid {server.postmaster_pid()}, port {server.port}, fsync on) and its "
            f"database up in {time.monotonic() - started:.1f}s")
        return measure(peers, *args, workdir=workdir, log=log, store=url, database_pid=server.postmaster_pid(),
                       **kwargs)
    finally:
        server.stop()
        log("PostgreSQL server stopped")


def parse_stores(text: str | None) -> tuple[list[str], str | None]:
    """The stores to measure and a note (or an ``error:`` line when the text is bad): the default is both
    when PostgreSQL's binaries are found, else sqlite alone."""
    from benchmarks.postgres_server import binaries

    if text is None:
        if binaries() is None:
            return ["sqlite"], "note: no PostgreSQL server binaries (initdb, pg_ctl) found: measuring sqlite only"
        return list(STORES), None
    stores = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stores if s not in STORES]
    if not stores or unknown or len(set(stores)) != len(stores):
        return [], f"error: --stores {text!r}: a comma-separated list of {', '.join(STORES)}, each once"
    if "postgresql" in stores and binaries() is None:
        return [], ("error: --stores postgresql needs the PostgreSQL server binaries (initdb, pg_ctl) on PATH "
                    "or in /usr/lib/postgresql/*/bin")
    return stores, None


def summary(figures: dict) -> str:
    line = (f"{figures['store']}, {figures['peers']} peers: {figures['heartbeats_per_s']} heartbeats/s "
            f"(offered {figures['offered_heartbeats_per_s']}), p50 {figures['heartbeat_p50_ms']} ms, "
            f"p99 {figures['heartbeat_p99_ms']} ms; {figures['reports_per_s']} reports/s "
            f"(offered {figures['offered_reports_per_s']}), p99 {figures['report_p99_ms']} ms; coordinator "
            f"{figures['coordinator_cpu']} cores (serve {figures['serve_cpu']}), {figures['rss_mb']} MB; load "
            f"generators {figures['load_generator_cpu']} cores")
    if figures["database_cpu"] is not None:
        line += f"; PostgreSQL server {figures['database_cpu']} cores, {figures['database_rss_mb']} MB"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks capacity",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--peers", type=int, required=True, help="simulated peers")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (default %(default)s)")
    parser.add_argument("--interval", type=float, default=2.0, help="the run's heartbeat interval (default %(default)s)")
    parser.add_argument("--epoch-seconds", type=float, default=10.0,
                        help="seconds per epoch: each peer reports once per epoch (default %(default)s)")
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes (default %(default)s)")
    parser.add_argument("--orgs", type=int, default=2, help="orgs the peers are spread over (default %(default)s)")
    parser.add_argument("--warmup", type=float, help="seconds between the last join and the window "
                                                     "(default: 2 intervals, at least 4)")
    parser.add_argument("--workdir", type=Path, help="where the temp data dir goes (default: the system's)")
    parser.add_argument("--stores", help="comma-separated, measured in this order: sqlite,postgresql (default: "
                                         "both when PostgreSQL's binaries are found, else sqlite)")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.seconds <= 0 or args.interval <= 0 or args.epoch_seconds <= 0 or \
            args.generators < 1 or args.orgs < 1:
        print("error: --peers, --generators and --orgs must be >= 1; --seconds, --interval and --epoch-seconds > 0",
              file=sys.stderr)
        return 2
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    stores, note = parse_stores(args.stores)
    if note:
        print(note, file=sys.stderr)
    if not stores:
        return 2

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # the finally blocks end every process started
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    figures: dict = {store: None for store in STORES}
    try:
        for store in stores:
            run = measure_postgresql if store == "postgresql" else measure
            figures[store] = run(args.peers, args.seconds, args.interval, args.epoch_seconds, args.generators,
                                 args.orgs, args.warmup, workdir=args.workdir, log=say)
            print(summary(figures[store]), flush=True)
    except KeyboardInterrupt:
        print("interrupted: every process this benchmark started was stopped", file=sys.stderr)
        return 130
    if note:
        figures["note"] = note.removeprefix("note: ")
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
