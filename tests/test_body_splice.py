"""
Response bodies of known length moved inside the kernel (``splice = true``,
:class:`proxyframe.protocol.splice.SpliceBody`) and through Python
(``splice = false``): each test runs with both, through real sockets.

The splice takes over once the response head is written and at least
256 KiB of a ``Content-Length`` body are left, and gives both connections
back at the body's end, so keep-alive, timeouts, an origin's early close
and a client's departure must behave exactly as without it.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

from flowtools import MIB, SMALL_BUFFER, TIMEOUT, BodyHash, Progress, blocked_sender_origin, expected_sha256
from support import body_chunks, pipe_descriptors, read_response


def get_head(proxy, url: str, rcvbuf: bool = False) -> tuple[socket.socket, bytes]:
    """Send a GET for *url* on a new connection and read the head byte by byte; returns (socket, head)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.settimeout(TIMEOUT)
    sock.connect((proxy.host, proxy.port))
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {head!r}"
        head += byte
    return sock, head


def test_keep_alive_both_sides_around_spliced_bodies(splice_proxy, origin):
    """
    Three 4 MiB bodies and two small ones, alternated on one client
    connection, arrive byte-exact, and the origin sees one connection:
    after each spliced body both connections carry on as before.
    """
    proxy = splice_proxy()
    sizes = [4 * MIB + 1, 5, 4 * MIB + 2, 300 * 1024, 4 * MIB + 3]
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        for n, size in enumerate(sizes):
            sock.sendall(f"GET {origin.url(f'/bytes/{size}?seed={n}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = read_response(sock, "GET")
            assert (status, len(body)) == (200, size)
            assert hashlib.sha256(body).hexdigest() == expected_sha256(size, n), f"body {n} differs"
    assert origin.connections == 1
    assert len(origin.requests) == len(sizes)


def test_waiting_body_bytes_are_in_a_pipe_only_with_splice(splice_proxy, origin):
    """
    Which path ran: while a client reads nothing of a 64 MiB body, the
    splice holds the waiting bytes in one pipe; Python holds them in its
    transports and opens none.  Then the whole body arrives byte-exact.
    """
    size, sent = 64 * MIB, Progress()
    proxy = splice_proxy()
    # A small exchange first, so that what the proxy opens once is open.
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(sock, "GET")[2] == b"hello"
    before = pipe_descriptors(proxy.pid)
    blocked_sender_origin(origin, size, sent)
    sock, head = get_head(proxy, origin.url("/big"), rcvbuf=True)
    with sock:
        assert head.startswith(b"HTTP/1.1 200 ")
        sent.wait_stalled()
        added = pipe_descriptors(proxy.pid) - before
        body = BodyHash()
        while body.length < size and (piece := sock.recv(MIB)):
            body.update(piece)
    assert added == (2 if splice_proxy.splice else 0), added
    assert (body.length, body.hexdigest()) == (size, expected_sha256(size, 1))


def test_origin_closing_mid_body_closes_the_client(splice_proxy, origin):
    """
    An origin that announces 8 MiB and closes after 3 MiB: the client gets
    the head and exactly those 3 MiB, then the connection closes (RFC 9112
    §8: an incomplete message is not passed on as complete).
    """
    def handler(conn, req):
        conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {8 * MIB}\r\n\r\n".encode())
        for piece in body_chunks(3 * MIB, seed=5):
            conn.send(piece)
        return False

    origin.handler = handler
    proxy = splice_proxy()
    sock, head = get_head(proxy, origin.url("/cut"))
    with sock:
        body = BodyHash()
        while piece := sock.recv(MIB):
            body.update(piece)
    assert (body.length, body.hexdigest()) == (3 * MIB, expected_sha256(3 * MIB, 5))


def test_origin_stalling_mid_body_is_cut_after_the_response_timeout(splice_proxy, origin):
    """
    An origin that sends 2 MiB of 8 and then nothing, while the client
    reads: after ``timeouts.response`` (1 s) the client's connection is
    closed; it does not hang.
    """
    release = threading.Event()

    def handler(conn, req):
        conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {8 * MIB}\r\n\r\n".encode())
        for piece in body_chunks(2 * MIB, seed=6):
            conn.send(piece)
        release.wait(TIMEOUT)
        return False

    origin.handler = handler
    proxy = splice_proxy(timeouts={"response": 1.0})
    try:
        sock, head = get_head(proxy, origin.url("/stall"))
        with sock:
            body = BodyHash()
            while body.length < 2 * MIB:
                body.update(sock.recv(MIB))
            stalled = time.monotonic()
            assert sock.recv(1) == b""
            waited = time.monotonic() - stalled
    finally:
        release.set()
    assert 0.5 <= waited < 5, waited
    assert body.hexdigest() == expected_sha256(2 * MIB, 6)


def test_client_leaving_mid_body_closes_the_origin_and_the_proxy_carries_on(splice_proxy, origin):
    """
    A client that reads 1 MiB of 256 MiB and closes: the proxy closes the
    origin's connection (its sending fails well before the end), and the
    next request is served.
    """
    failed = threading.Event()

    def handler(conn, req):
        if req.target.endswith("/big"):
            conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {256 * MIB}\r\n\r\n".encode())
            try:
                for piece in body_chunks(256 * MIB, seed=7):
                    conn.send(piece)
            except OSError:
                failed.set()
            return False
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    origin.handler = handler
    proxy = splice_proxy()
    sock, head = get_head(proxy, origin.url("/big"))
    with sock:
        received = 0
        while received < MIB:
            received += len(sock.recv(MIB))
    assert failed.wait(TIMEOUT), "the origin kept sending to a client that left"
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {origin.url('/next')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_response(sock, "GET")[::2] == (200, b"ok")
