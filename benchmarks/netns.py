"""A private network for benchmarks: one namespace per host, joined by a bridge, links shaped with tbf.

Why namespaces: a volunteer's link (10-100 Mbit/s) can only be reproduced on one machine by putting
every process behind its own shaped interface. Layout (everything named ``plk-<pid>-...``, so
cleanup never touches anything it did not create, and nothing is created in the root namespace):

    plk-<pid>-hub: bridge br0, with one veth end ``v<i>`` per host (tbf here shapes the host's download)
    plk-<pid>-<host>: ``eth0`` (tbf here shapes the host's upload), address 10.77.0.<i>/24, lo up

The /24 lives only inside these namespaces and is routed nowhere. Wire bytes are read from
``/sys/class/net/v<i>/statistics`` inside the hub namespace (the host's upload is the hub end's rx).
Where namespaces are unavailable (not root, no ``ip``), :class:`LoopbackLab` runs every host on
127.0.0.1 without shaping and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass

SUBNET = "10.77.0"  # a private /24, only inside our own namespaces
COMMAND_TIMEOUT = 20.0


@dataclass(frozen=True)
class Host:
    name: str
    address: str  # the address its processes listen on
    namespace: str | None  # None on loopback
    hub_interface: str | None  # the hub end of its veth, where its wire bytes are counted
    rate_mbit: float | None  # None: unshaped

    def command(self, args: list[str]) -> list[str]:
        """args, run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *args] if self.namespace else list(args)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=check)


def _tc(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], capture_output=True, text=True,
                   timeout=COMMAND_TIMEOUT, check=True)


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf settings for a link of rate_mbit: a burst of ~5 ms of traffic (at least 16 KB, so a
    full-size segment always fits), and at most 100 ms of queue."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes * 0.005), 16_384)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]


def namespaces_available() -> tuple[bool, str]:
    """Whether this process can build the lab, and if not, why (for the output)."""
    if os.geteuid() != 0:
        return False, "not root: network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "the ip/tc commands (iproute2) are missing"
    return True, ""


def existing_namespaces(prefix: str) -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]


def reclaim_orphans(prefix: str = "plk-") -> list[str]:
    """Delete the namespaces of labs whose process is gone (``plk-<pid>-*``): an owner killed with
    SIGKILL (a CI timeout, a killed test run) cannot run :meth:`NetnsLab.close`, so each new lab
    removes what dead owners left. Returns the names deleted."""
    deleted = []
    for name in existing_namespaces(prefix):
        owner = name[len(prefix):].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        _ip("netns", "del", name, check=False)
        deleted.append(name)
    return deleted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NetnsLab:
    """Namespaces, veths and a bridge, all removed by :meth:`close` (idempotent, also after a failure)."""

    mode = "netns"

    def __init__(self, prefix: str | None = None):
        reclaim_orphans()
        self.prefix = prefix or f"plk-{os.getpid()}-"
        self.hub = f"{self.prefix}hub"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, rate_mbit: float | None) -> Host:
        """A new namespace on the bridge; rate_mbit shapes both directions of its link."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the lab is closed")
            return self._add_host(rate_mbit)

    def hosts_for(self, count: int, rate_mbit: float | None) -> list[Host]:
        """An unshaped support host (coordinator, bootstrap node), then count shaped peer hosts."""
        return [self.add_host(None)] + [self.add_host(rate_mbit) for _ in range(count)]

    def _add_host(self, rate_mbit: float | None) -> Host:
        index = len(self.hosts) + 1
        if index > 250:
            raise RuntimeError("the lab's /24 is full")
        name = f"h{index}"
        namespace, hub_end = f"{self.prefix}{name}", f"v{index}"
        self._add_namespace(namespace)
        _ip("link", "add", hub_end, "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.hub, "link", "set", hub_end, "master", "br0")
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        address = f"{SUBNET}.{index}"
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        if rate_mbit:
            _tc(namespace, "qdisc", "add", "dev", "eth0", "root", *tbf_args(rate_mbit))
            _tc(self.hub, "qdisc", "add", "dev", hub_end, "root", *tbf_args(rate_mbit))
        host = Host(name, address, namespace, hub_end, rate_mbit)
        self.hosts.append(host)
        return host

    def counter_command(self) -> list[str]:
        """A command that runs in the hub namespace, where /sys/class/net shows the hub's veth ends."""
        return ["ip", "netns", "exec", self.hub]

    def close(self) -> list[str]:
        """Delete every namespace this lab made (their veths and the bridge go with them); returns
        the names that could not be deleted."""
        with self._lock:
            self._closed = True
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces = [name for name in self._namespaces if name in existing_namespaces(self.prefix)]
        return list(self._namespaces)


class LoopbackLab:
    """The fallback: every host is 127.0.0.1, nothing is shaped, and wire bytes are not separable
    per host (the loopback counter also sees other programs' traffic)."""

    mode = "loopback"

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"plk-{os.getpid()}-"
        self.hosts: list[Host] = []

    def add_host(self, rate_mbit: float | None) -> Host:
        host = Host(f"h{len(self.hosts) + 1}", "127.0.0.1", None, None, None)
        self.hosts.append(host)
        return host

    def hosts_for(self, count: int, rate_mbit: float | None) -> list[Host]:
        return [self.add_host(None) for _ in range(count + 1)]

    def counter_command(self) -> list[str]:
        return []

    def close(self) -> list[str]:
        return []
