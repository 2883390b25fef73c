#!/usr/bin/env python3
"""
CPU per relayed byte: proxyframe with ``splice`` on and off, side by side.

Two proxyframe processes (``workers = 1``, no filters) run at once, one
with ``splice = true`` (the kernel moves the bytes) and one with
``false`` (Python moves them).  A local origin sends SIZE MiB of random
bytes to a client that counts them, ROUNDS times through each proxy, in
two ways: through a CONNECT tunnel ("tunnel"), and as the body of a plain
HTTP response with ``Content-Length`` ("body").  For each it prints the
medians of the client's MB/s and of the proxy process's CPU seconds (user
+ system, from ``/proc/PID/stat``) per GiB, and the ratios splice/python.
"direct" is the same transfer without a proxy (MB/s only).

Plain TCP, no TLS: what is measured is the relay alone.  ``run.py``'s
tests (b) and (d) measure whole downloads against Squid.

    python3 benchmarks/splice.py --python /path/to/venv/bin/python [--size 512] [--rounds 5]

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
    """
    Serves *size* bytes on each connection: after a GET head, as a
    ``Content-Length`` response; after anything else (one byte through a
    tunnel), raw; then closes.
    """

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
                first = conn.recv(4096)
                if first.startswith(b"GET "):
                    while not first.endswith(b"\r\n\r\n"):
                        first += conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
                for _ in range(self.size // MIB):
                    conn.sendall(self.chunk)


def start_proxy(python: str, workdir: str, origin_port: int, splice: str) -> tuple[subprocess.Popen, int]:
    """A proxyframe process on a free loopback port; returns it and its port."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = os.path.join(workdir, f"splice-{splice}.toml")
    with open(config, "w") as f:
        f.write(f'listen = ["tcp:{port}:interface=127.0.0.1"]\nworkers = 1\n'
                f"connect_ports = [{origin_port}]\nsplice = {splice}\nfilter = []\n")
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
    sys.exit(f"proxyframe (splice = {splice}) did not start listening on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* so far (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def transfer(origin: Origin, proxy_port: int | None, how: str) -> float:
    """
    One download of the origin's bytes (*how*: ``"tunnel"`` or ``"body"``)
    through the proxy on *proxy_port*, or directly; returns seconds.
    """
    authority = f"127.0.0.1:{origin.port}"
    with socket.create_connection(("127.0.0.1", proxy_port or origin.port)) as sock:
        if proxy_port and how == "tunnel":
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            if not read_head(sock).startswith(b"HTTP/1.1 200 "):
                sys.exit("CONNECT refused")
        start = time.perf_counter()
        if how == "body":
            target = f"http://{authority}/" if proxy_port else "/"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
            head = read_head(sock)
            if not head.startswith(b"HTTP/1.1 200 "):
                sys.exit(f"GET failed: {head!r}")
        else:
            sock.sendall(b"g")
        received, buf = 0, bytearray(MIB)
        while received < origin.size and (count := sock.recv_into(buf)):
            received += count
        elapsed = time.perf_counter() - start
    if received != origin.size:
        sys.exit(f"received {received} bytes, expected {origin.size}")
    return elapsed


def read_head(sock: socket.socket) -> bytes:
    """A response head, read byte by byte so that no body byte is taken."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            sys.exit(f"connection closed after {head!r}")
        head += byte
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs proxyframe")
    parser.add_argument("--size", type=int, default=512, help="MiB per transfer (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="transfers per relay (default 5)")
    args = parser.parse_args()
    origin = Origin(args.size * MIB)
    workdir = tempfile.mkdtemp(prefix="proxyframe-splice-bench-")
    proxies = {name: start_proxy(args.python, workdir, origin.port, value) for name, value in RELAYS.items()}
    try:
        for how in ("tunnel", "body"):
            report(how, measure(origin, proxies, how, args.rounds, args.size))
    finally:
        for proc, _ in proxies.values():
            proc.terminate()
            proc.wait(10)


def measure(origin: Origin, proxies: dict, how: str, rounds: int, size_mib: int) -> tuple[dict, dict]:
    """*rounds* transfers each way; returns (MB/s by relay, CPU s/GiB by relay)."""
    mbps: dict[str, list[float]] = {name: [] for name in ("direct", *RELAYS)}
    cpu_per_gib: dict[str, list[float]] = {name: [] for name in RELAYS}
    for _ in range(rounds):
        mbps["direct"].append(origin.size / transfer(origin, None, how) / 1e6)
        for name, (proc, port) in proxies.items():
            before = cpu_seconds(proc.pid)
            mbps[name].append(origin.size / transfer(origin, port, how) / 1e6)
            cpu_per_gib[name].append((cpu_seconds(proc.pid) - before) * 1024 / size_mib)
    return mbps, cpu_per_gib


def report(how: str, results: tuple[dict, dict]) -> None:
    mbps, cpu_per_gib = results
    print(f"{how}: {len(mbps['direct'])} transfers per relay, medians (CPU: the proxy process)")
    print(f"  {'relay':8} {'MB/s':>8} {'CPU s/GiB':>10}")
    for name, values in mbps.items():
        cpu = f"{statistics.median(cpu_per_gib[name]):10.2f}" if name in cpu_per_gib else f"{'-':>10}"
        print(f"  {name:8} {statistics.median(values):8.0f} {cpu}")
    print("  splice/python: MB/s %.2fx, CPU per GiB %.2fx" % (
        statistics.median(mbps["splice"]) / statistics.median(mbps["python"]),
        statistics.median(cpu_per_gib["splice"]) / statistics.median(cpu_per_gib["python"])))


if __name__ == "__main__":
    main()
