"""Raw TCP throughput, one stream: the unshaped loopback number (what the CPUs allow) and a check
that a shaped link delivers what tbf promises (~96% of the rate).

Run as ``python -m benchmarks.throughput serve HOST PORT SECONDS`` in one namespace and
``... send HOST PORT SECONDS`` in another; :func:`loopback_mbit` does both in-process on 127.0.0.1.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

CHUNK = 1 << 16


def receive(server: socket.socket, seconds: float) -> float:
    """Accept one stream and return the Mbit/s it delivered, timed from its first byte."""
    server.settimeout(seconds + 10)
    conn, _ = server.accept()
    with conn:
        conn.settimeout(5)
        received, first = 0, None
        try:
            while True:
                data = conn.recv(CHUNK * 4)
                if not data:
                    break
                first = first or time.perf_counter()
                received += len(data)
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - first if first else 1.0
    return received * 8 / elapsed / 1e6


def send(host: str, port: int, seconds: float) -> None:
    payload = b"\0" * CHUNK
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, port), timeout=10) as conn:
        while time.monotonic() < deadline:
            conn.sendall(payload)


def listen(host: str, port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(1)
    return server


def loopback_mbit(seconds: float = 1.0) -> float:
    """Unshaped one-stream TCP throughput on 127.0.0.1 in this process (Mbit/s)."""
    server = listen("127.0.0.1", 0)
    sender = threading.Thread(target=send, args=("127.0.0.1", server.getsockname()[1], seconds), daemon=True)
    sender.start()
    try:
        return receive(server, seconds)
    finally:
        server.close()
        sender.join(timeout=seconds + 10)


def main(argv: list[str]) -> None:
    role, host, port, seconds = argv[0], argv[1], int(argv[2]), float(argv[3])
    if role == "serve":
        server = listen(host, port)
        print(f"{receive(server, seconds):.3f}", flush=True)
    else:
        time.sleep(0.3)
        send(host, port, seconds)


if __name__ == "__main__":
    main(sys.argv[1:])
