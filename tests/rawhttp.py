"""
Raw-wire HTTP/1.1 helpers for the tests: a client that sends any bytes and
reads responses with a small parser that keeps every field exactly as it
arrived (:class:`Client`, :class:`Reply`), assertions about the proxy's own
error replies and its output, and raw origin behaviours
(:class:`RawRecorder`, :func:`scripted_origin`).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

#: Seconds a raw client or a raw origin waits on its socket.
TIMEOUT = 10.0


@dataclass
class Reply:
    """One response as the client read it off the wire."""

    status: int
    version: bytes
    fields: list[tuple[bytes, bytes]]
    raw_head: bytes
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get_all(self, name: str) -> list[str]:
        return [v.decode("latin-1") for n, v in self.fields if n.decode("latin-1").lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.get_all(name)
        return ", ".join(values) if values else None

    def names(self) -> set[str]:
        return {n.decode("latin-1").lower() for n, _ in self.fields}


def parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    pairs = []
    for line in lines:
        name, _, value = line.partition(b":")
        pairs.append((name, value.strip(b" \t")))
    return pairs


class Client:
    """
    A raw client connection (TCP_NODELAY) with a receive buffer: sends any
    bytes, and reads responses with a small HTTP/1.1 parser that keeps the
    fields exactly as they arrived.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.reset = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            data = b""
        self.buf += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        """:returns: the bytes up to *marker* (consumed, not returned)."""
        while marker not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {self.buf!r}")
        data, self.buf = self.buf.split(marker, 1)
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed {n - len(self.buf)} bytes short")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> Reply:
        head = self.read_until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        version, status = lines[0].split(b" ", 2)[:2]
        return Reply(int(status), version, parse_fields(lines[1:]), head)

    def read_response(self, method: str = "GET") -> Reply:
        """Read one response (a 1xx too) with its body, framed per RFC 9112 §6.3."""
        reply = self.read_head()
        te, length = reply.header("transfer-encoding"), reply.header("content-length")
        if method == "HEAD" or reply.status < 200 or reply.status in (204, 304):
            return reply
        if te is not None:
            assert te == "chunked", reply.raw_head
            pieces = []
            while size := int(self.read_until(b"\r\n").split(b";")[0], 16):
                pieces.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            reply.body = b"".join(pieces)
            lines = []
            while line := self.read_until(b"\r\n"):
                lines.append(line)
            reply.trailers = parse_fields(lines)
        elif length is not None:
            reply.body = self.read_exact(int(length))
        else:
            reply.body = self.read_to_close()
        return reply

    def read_to_close(self) -> bytes:
        """
        :returns: everything until the peer closes (FIN or reset).
        :raises AssertionError: the peer kept the connection open.
        """
        try:
            while self._fill():
                pass
        except TimeoutError:
            raise AssertionError(f"the proxy did not close the connection; got {self.buf!r}") from None
        data, self.buf = self.buf, b""
        return data


def exchange(proxy, data: bytes, method: str = "GET") -> Reply:
    """Send *data* on a new connection and read one response."""
    with Client(proxy.port) as client:
        client.send(data)
        return client.read_response(method)


def assert_proxy_status(reply: Reply, error: str, host: str | None = None) -> None:
    """The reply is the proxy's own error page: RFC 9209 Proxy-Status naming *error* (and *host*)."""
    status = reply.header("proxy-status") or ""
    assert status.startswith(f"proxyframe; error={error}"), reply.raw_head
    if host is not None:
        assert host in reply.body.decode("latin-1"), reply.body


def assert_ran_clean(proxy) -> None:
    """
    The proxy process is still running; stop it, and its whole output
    (read to the end) holds no traceback.
    """
    assert proxy.proc.poll() is None, "\n".join(proxy.lines)
    proxy.stop()
    proxy.wait_for_line("Server Shut Down")
    assert not [line for line in proxy.lines if "Traceback" in line], "\n".join(proxy.lines)


class RawRecorder:
    """
    ``origin.raw`` that answers nothing and records every byte the proxy
    sends on each connection, until the proxy closes it.
    """

    def __init__(self, origin) -> None:
        self.chunks: list[bytes] = []
        self.finished = 0
        self._lock = threading.Lock()
        origin.raw = self._serve

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        try:
            while piece := sock.recv(65536):
                self.chunks.append(piece)
        finally:
            with self._lock:
                self.finished += 1

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def scripted_origin(origin, *steps) -> list[bytes]:
    """
    Make *origin* read one request head per connection, then play *steps*:
    ``bytes`` are sent, a ``threading.Event`` is waited for (bounded), and
    ``None`` closes the connection at once.  After the last step it reads
    until the proxy closes.

    :returns: the list the request heads are appended to.
    """
    heads: list[bytes] = []

    def serve(sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return
            data += piece
        heads.append(data)
        for step in steps:
            if step is None:
                return
            if isinstance(step, threading.Event):
                step.wait(TIMEOUT)
            else:
                sock.sendall(step)
        while sock.recv(65536):
            pass

    origin.raw = serve
    return heads


def fill(template: bytes, origin) -> bytes:
    """Replace ``URL`` with the origin's absolute URL and ``PORT`` with its port."""
    return template.replace(b"URL", b"http://127.0.0.1:PORT/").replace(b"PORT", str(origin.port).encode())
