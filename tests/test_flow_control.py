"""
Flow control: bodies stream through the proxy with back-pressure both ways.

A client that stops reading pauses the origin, an origin that stops reading
pauses the client, and the proxy's memory stays bounded whatever the body
size: 1 GiB goes through in each direction with the proxy's resident set
growing by less than :data:`RSS_BOUND`, and the sha256 at the far end
matches.

The generic helpers (:class:`Progress`, :class:`RssSampler`,
:class:`Pacer`, :class:`BodyHash` and others) are in ``flowtools.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading

import pytest

from flowtools import (
    blocked_sender_origin,
    GIB,
    IN_FLIGHT_BOUND,
    MIB,
    SMALL_BUFFER,
    TIMEOUT,
    BodyHash,
    Pacer,
    PacedSocket,
    Progress,
    RssSampler,
    expected_sha256,
    small_buffer_socket,
)
from support import OriginConnection, Received, body_chunks, read_response

#: Most the proxy's RSS may grow over its baseline while a body streams.
RSS_BOUND = 64 * MIB


# -- helpers --------------------------------------------------------------------

@contextlib.contextmanager
def get(proxy, url: str, rcvbuf: bool = False):
    """Send a GET for *url* on a raw socket; yields the response (head read), then closes."""
    with small_buffer_socket(socket.SO_RCVBUF if rcvbuf else None) as sock:
        sock.connect((proxy.host, proxy.port))
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()
        yield resp
        resp.close()


def upload(proxy, url: str, size: int, seed: int, chunked: bool, sent: Progress | None = None,
           sndbuf: bool = False) -> int:
    """
    POST *size* bytes of ``body_chunks(size, seed)`` to *url* through the
    proxy, framed by Content-Length or chunked; returns the status.
    """
    sent = sent or Progress()
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    with small_buffer_socket(socket.SO_SNDBUF if sndbuf else None) as sock:
        sock.connect((proxy.host, proxy.port))
        sock.sendall(f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n{framing}\r\n\r\n".encode())
        for piece in body_chunks(size, seed):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent.add(len(piece))
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        status, _, _ = read_response(sock, "POST")
        return status


def reading_origin(origin, gate: threading.Event | None = None, pacer: Pacer | None = None) -> list[Received]:
    """
    Make *origin* read one request per connection, paced by *pacer*, after
    reading nothing at all until *gate* is set (with a small receive
    buffer); it records the request in the returned list and answers 200
    with an empty body.
    """
    seen: list[Received] = []

    def raw(sock: socket.socket) -> None:
        if gate is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
            if not gate.wait(TIMEOUT):
                return
        req = OriginConnection(PacedSocket(sock, pacer) if pacer else sock, 1).read_request()
        if req is not None:
            seen.append(req)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    origin.raw = raw
    return seen


# -- memory stays bounded -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("framing, size", [("length", GIB), ("chunked", 256 * MIB)])
def test_large_download_is_byte_exact_in_bounded_memory(proxy, origin, framing, size):
    """
    A 1 GiB Content-Length response (and a 256 MiB chunked one, which the
    proxy re-chunks) reaches a client that hashes as it reads, and stops
    reading for 1 s twice on the way, with the right sha256, while the
    proxy's RSS grows by less than 64 MiB: the body streams and the
    client's pauses pause the origin (RFC 9112 §6, §7.1).
    """
    body = BodyHash()
    with RssSampler(proxy) as rss, get(proxy, origin.url(f"/bytes/{size}?framing={framing}&seed=11")) as resp:
        body.read(resp, pacer=Pacer(size // 3 + 1))
    assert resp.status == 200
    assert body.length == size
    assert body.hexdigest() == expected_sha256(size, 11)
    assert rss.growth < RSS_BOUND, f"proxy RSS grew by {rss.growth / MIB:.1f} MiB"
    assert len(origin.requests) == 1


@pytest.mark.slow
@pytest.mark.parametrize("chunked, size", [(False, GIB), (True, 256 * MIB)])
def test_large_upload_is_byte_exact_in_bounded_memory(proxy, origin, chunked, size):
    """
    A 1 GiB Content-Length request body (and a 256 MiB chunked one) arrives
    at an origin that stops reading for 1 s twice on the way with the right
    length and sha256, while the proxy's RSS grows by less than 64 MiB: the
    request body streams upstream and the origin's pauses pause the client
    (RFC 9112 §6).
    """
    seen_list = reading_origin(origin, pacer=Pacer(size // 3 + 1))
    with RssSampler(proxy) as rss:
        status = upload(proxy, origin.url("/upload"), size, seed=11, chunked=chunked)
    assert status == 200
    (seen,) = seen_list
    assert seen.header("transfer-encoding" if chunked else "content-length") == ("chunked" if chunked else str(size))
    assert seen.body_length == size
    assert seen.body_sha256 == expected_sha256(size, 11)
    assert rss.growth < RSS_BOUND, f"proxy RSS grew by {rss.growth / MIB:.1f} MiB"


# -- back-pressure ------------------------------------------------------------

def test_slow_client_pauses_the_origin(proxy, origin):
    """
    A client that stops reading mid-body pauses the origin: once the origin's
    ``sendall`` blocks, it has sent at most IN_FLIGHT_BOUND (what the kernel
    may buffer, plus 1 MiB) more than the client read (of a 512 MiB body).
    When the client reads again the rest flows
    and the whole body's sha256 matches.
    """
    size, sent = 512 * MIB, Progress()
    blocked_sender_origin(origin, size, sent)
    body = BodyHash()
    with get(proxy, origin.url("/big"), rcvbuf=True) as resp:
        body.read(resp, upto=32 * MIB)
        stalled_at = sent.wait_stalled()
        assert stalled_at - body.length < IN_FLIGHT_BOUND, f"origin sent {stalled_at / MIB:.1f} MiB"
        body.read(resp)
    assert (resp.status, body.length) == (200, size)
    assert body.hexdigest() == expected_sha256(size, 1)


def test_slow_origin_pauses_the_client(proxy, origin):
    """
    An origin that reads nothing pauses the client's upload: the client's
    blocking ``sendall`` of a 512 MiB body stalls after at most IN_FLIGHT_BOUND.
    When the origin reads, the whole body arrives with the right sha256
    and the client gets the origin's 200.
    """
    size, sent, gate = 512 * MIB, Progress(), threading.Event()
    seen = reading_origin(origin, gate)
    result: list[int] = []
    sender = threading.Thread(target=lambda: result.append(
        upload(proxy, origin.url("/upload"), size, seed=2, chunked=False, sent=sent, sndbuf=True)), daemon=True)
    sender.start()
    try:
        stalled_at = sent.wait_stalled()
    finally:
        gate.set()
    assert stalled_at < IN_FLIGHT_BOUND, f"client sent {stalled_at / MIB:.1f} MiB before it was paused"
    sender.join(TIMEOUT)
    assert result == [200]
    (req,) = seen
    assert (req.method, req.target, req.body_length) == ("POST", "/upload", size)
    assert req.body_sha256 == expected_sha256(size, 2)
