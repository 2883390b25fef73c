"""
Flow-control helpers for the tests: byte counts another thread advances
(:class:`Progress`), the proxy's resident set sampled over a block
(:class:`RssSampler`), sockets with small buffers, slow readers
(:class:`Pacer`, :class:`PacedSocket`) and a running body hash
(:class:`BodyHash`).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import socket
import threading
import time

from support import OriginConnection, Received, body_chunks, body_sha256

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: SO_RCVBUF / SO_SNDBUF of the test's own sockets in back-pressure tests,
#: so that what is measured is the proxy's buffering.
SMALL_BUFFER = 256 * KIB


def _kernel_max(name: str, default: int) -> int:
    """The largest buffer TCP autotuning may give a socket (the third
    number of /proc/sys/net/ipv4/tcp_rmem or tcp_wmem), bytes."""
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return default


#: Most bytes that may be in flight between a blocked sender and a reader
#: that stopped, with the test's own sockets kept to SMALL_BUFFER: what the
#: kernel may buffer in the proxy's two sockets (a receive buffer it stopped
#: reading, autotuned up to tcp_rmem's maximum: 32 MiB on some machines; a
#: send buffer up to tcp_wmem's), plus 1 MiB for the proxy's own write
#: buffer and the read in hand.  Without back-pressure the whole body
#: (hundreds of MiB) would go through.
IN_FLIGHT_BOUND = (_kernel_max("tcp_rmem", 6 * MIB) + _kernel_max("tcp_wmem", 4 * MIB)
                   + 2 * SMALL_BUFFER + MIB)
TIMEOUT = 30.0


class Progress:
    """A byte count that another thread advances (bytes sent or read)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def wait_stalled(self, quiet: float = 1.0, timeout: float = TIMEOUT) -> int:
        """
        Wait until the count has not moved for *quiet* seconds (the thread
        advancing it is blocked) and return it; fail after *timeout*.
        """
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now, value = time.monotonic(), self.count
            if value != last:
                last, since = value, now
            elif now - since >= quiet:
                return value
            time.sleep(0.05)
        raise AssertionError(f"the transfer never stalled ({self.count} bytes moved)")


class RssSampler:
    """
    Samples the proxy's RSS every 0.2 s in a background thread while the
    ``with`` block runs; :attr:`growth` is the peak over the baseline taken
    on entry.
    """

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.proxy.rss_bytes())

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self.proxy.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.proxy.rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def small_buffer_socket(option: int | None) -> socket.socket:
    """A TCP socket with *option* (``SO_RCVBUF``/``SO_SNDBUF``) set to SMALL_BUFFER."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if option is not None:
        sock.setsockopt(socket.SOL_SOCKET, option, SMALL_BUFFER)
    sock.settimeout(TIMEOUT)
    return sock


@functools.cache
def expected_sha256(size: int, seed: int) -> str:
    """:func:`support.body_sha256`, computed once per (size, seed) per run."""
    return body_sha256(size, seed)


class Pacer:
    """
    A slow reader: :meth:`advance` stops for *pause* seconds each time the
    count of bytes read passes a multiple of *every*.  While it stops,
    whatever the proxy cannot hand on must wait in the sender, not in the
    proxy's memory.
    """

    def __init__(self, every: int, pause: float = 1.0) -> None:
        self.every, self.pause, self.count = every, pause, 0

    def advance(self, n: int) -> None:
        before, self.count = self.count, self.count + n
        if before // self.every != self.count // self.every:
            time.sleep(self.pause)


class PacedSocket:
    """A socket whose ``recv`` goes through a :class:`Pacer`; everything else is the socket's."""

    def __init__(self, sock: socket.socket, pacer: Pacer) -> None:
        self._sock, self._pacer = sock, pacer

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self._pacer.advance(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class BodyHash:
    """The length and running sha256 of a body read so far."""

    def __init__(self) -> None:
        self.length = 0
        self._sha = hashlib.sha256()

    def update(self, piece: bytes) -> None:
        self.length += len(piece)
        self._sha.update(piece)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def read(self, resp: http.client.HTTPResponse, upto: int | None = None, pacer: Pacer | None = None) -> None:
        """Read *resp* body (until *upto* bytes in all, or its end), hashing it, paced by *pacer*."""
        while upto is None or self.length < upto:
            piece = resp.read(MIB if upto is None else min(MIB, upto - self.length))
            if not piece:
                return
            self.update(piece)
            if pacer is not None:
                pacer.advance(len(piece))


def blocked_sender_origin(origin, size: int, sent: Progress) -> None:
    """
    Make *origin* answer any request with *size* bytes of ``body_chunks(size,
    seed=1)`` sent in 64 KiB blocking ``sendall`` calls from a socket with
    a small send buffer, counting in *sent* what the proxy accepted.
    """
    def handler(conn: OriginConnection, req: Received) -> bool:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for piece in body_chunks(size, seed=1):
            conn.send(piece)
            sent.add(len(piece))
        return True

    origin.handler = handler
