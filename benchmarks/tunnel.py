#!/usr/bin/env python3
"""
CPU per tunnelled byte: proxyframe's two CONNECT relays side by side.

Two proxyframe processes (``workers = 1``, no filters) run at once, one
with ``splice_tunnels = true`` (the kernel relays the bytes) and one with
``false`` (Python relays them); a local origin sends SIZE MiB of random
bytes through a CONNECT tunnel of each in turn, ROUNDS times, to a client
that counts them.  For each relay it prints the medians of the client's
MB/s and of the proxy process's CPU seconds (user + system, from
``/proc/PID/stat``) per GiB, and the ratios splice/python.  "direct" is
the same transfer without a proxy (MB/s only).

Plain TCP, no TLS: what is measured is the relay alone.  ``run.py``'s
test (d) measures the whole TLS download against Squid.

    python3 benchmarks/tunnel.py --python /path/to/venv/bin/python [--size 512] [--rounds 5]

Run from the repository root (proxyframe runs from there, as in
``run.py``).  Linux only (``/proc``, and ``splice(2)``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
RELAYS = {"splice": "true", "python": "false"}


class Origin:
    """Accepts tunnelled connections; on each, waits for one byte, then sends *size* bytes and closes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunk = os.urandom(MIB)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                conn.recv(1)
                for _ in range(self.size // MIB):
                    conn.sendall(self.chunk)


def start_proxy(python: str, workdir: str, origin_port: int, splice: str) -> tuple[subprocess.Popen, int]:
    """A proxyframe process on a free loopback port; returns it and its port."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = os.path.join(workdir, f"splice-{splice}.toml")
    with open(config, "w") as f:
        f.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\nworkers = 1\n'
                f"connect_ports = [{origin_port}]\nsplice_tunnels = {splice}\nfilter = []\n")
    proc = subprocess.Popen([python, "-m", "twisted", "proxyframe", "--config", config], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"proxyframe (splice_tunnels = {splice}) did not start listening on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* so far (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def transfer(origin: Origin, proxy_port: int | None) -> float:
    """One download from *origin* (through a tunnel of the proxy on *proxy_port*); returns seconds."""
    port = proxy_port or origin.port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if proxy_port:
            sock.sendall(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
                         .encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(1)
            if not head.startswith(b"HTTP/1.1 200 "):
                sys.exit(f"CONNECT refused: {head!r}")
        start = time.perf_counter()
        sock.sendall(b"g")
        received, buf = 0, bytearray(MIB)
        while count := sock.recv_into(buf):
            received += count
        elapsed = time.perf_counter() - start
    if received != origin.size:
        sys.exit(f"received {received} bytes, expected {origin.size}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs proxyframe")
    parser.add_argument("--size", type=int, default=512, help="MiB per transfer (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="transfers per relay (default 5)")
    args = parser.parse_args()
    origin = Origin(args.size * MIB)
    workdir = tempfile.mkdtemp(prefix="proxyframe-tunnel-bench-")
    proxies = {name: start_proxy(args.python, workdir, origin.port, value) for name, value in RELAYS.items()}
    mbps: dict[str, list[float]] = {name: [] for name in ("direct", *RELAYS)}
    cpu_per_gib: dict[str, list[float]] = {name: [] for name in RELAYS}
    try:
        for _ in range(args.rounds):
            mbps["direct"].append(origin.size / transfer(origin, None) / 1e6)
            for name, (proc, port) in proxies.items():
                before = cpu_seconds(proc.pid)
                mbps[name].append(origin.size / transfer(origin, port) / 1e6)
                cpu_per_gib[name].append((cpu_seconds(proc.pid) - before) * 1024 / args.size)
    finally:
        for proc, _ in proxies.values():
            proc.terminate()
            proc.wait(10)
    print(f"{args.rounds} transfers of {args.size} MiB per relay, medians (CPU: the proxy process)")
    print(f"{'relay':8} {'MB/s':>8} {'CPU s/GiB':>10}")
    for name, values in mbps.items():
        cpu = f"{statistics.median(cpu_per_gib[name]):10.2f}" if name in cpu_per_gib else f"{'-':>10}"
        print(f"{name:8} {statistics.median(values):8.0f} {cpu}")
    print("splice/python: MB/s %.2fx, CPU per GiB %.2fx" % (
        statistics.median(mbps["splice"]) / statistics.median(mbps["python"]),
        statistics.median(cpu_per_gib["splice"]) / statistics.median(cpu_per_gib["python"])))


if __name__ == "__main__":
    main()
